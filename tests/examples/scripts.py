"""The repository's scripts imported as modules: examples/ and benchmarks/ are not packages
(nor is tests/runtime, whose conftest builds the toy models)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_script(relpath: str) -> ModuleType:
    """ROOT/relpath as a module, imported once (named after its path: benchmarks/soak.py is
    `script_benchmarks_soak`). benchmarks/ goes on sys.path: its scripts import each other."""
    name = "script_" + relpath.removesuffix(".py").replace("/", "_")
    if name not in sys.modules:
        if str(ROOT / "benchmarks") not in sys.path:
            sys.path.insert(0, str(ROOT / "benchmarks"))
        spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
