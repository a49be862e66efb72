"""Every module of ssmstream.runtime imports, and an Engine runs, with torch unimportable."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import ssmstream.runtime

RUNTIME_DIR = Path(ssmstream.runtime.__file__).parent

CHILD = r"""
import importlib, json, sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
import numpy as np
modules = json.loads(sys.argv[1])
failed = {}
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as e:  # report every module that fails, not just the first
        failed[name] = f"{type(e).__name__}: {e}"
from ssmstream.runtime import Batcher, Engine, SessionStore
eng = Engine(sys.argv[2], device="cpu", threads=1)
y, s = eng.step(np.array([1, 2]), eng.new_state(2))
store = SessionStore(eng.state_size)
loaded = sorted(
    m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] == "torch"
)
print(json.dumps({"failed": failed, "shape": list(y.shape), "torch": loaded}))
"""


def runtime_modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules([str(RUNTIME_DIR)])]
    return ["ssmstream.runtime", *(f"ssmstream.runtime.{n}" for n in sorted(names))]


def test_every_runtime_module_imports_without_torch(toy_token_model):
    modules = runtime_modules()
    assert {"ssmstream.runtime.engine", "ssmstream.runtime.batcher"} <= set(modules)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(modules), str(toy_token_model["model_dir"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}
    assert result["shape"] == [2, toy_token_model["d_out"]]
    assert result["torch"] == []
