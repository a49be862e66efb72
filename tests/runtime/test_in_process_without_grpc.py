"""The in-process API (Engine, SessionStore, Batcher, SessionService) runs where neither grpc
nor torch can be imported: an edge program that embeds sessions needs onnxruntime and numpy
only. tests/test_imports.py checks the import rules on the sources; this runs them."""

from __future__ import annotations

import json
import subprocess
import sys

BLOCKED = ["torch", "grpc", "grpc_health", "grpc_reflection", "grpc_status", "ssmstream.protos"]

CHILD = r"""
import asyncio, json, sys
for name in json.loads(sys.argv[2]):
    sys.modules[name] = None  # `import name` now raises ImportError
import numpy as np
from ssmstream.runtime import Batcher, Engine, SessionStore
from ssmstream.runtime.service import ServiceLimits, SessionService


async def main():
    eng = Engine(sys.argv[1], device="cpu", threads=1)
    store = SessionStore(eng.state_size, model_sha=eng.info["step_sha256"])
    batcher = Batcher(eng, store)
    await batcher.start()
    limits = ServiceLimits(rewind_window=64, prefix_cache_bytes=1 << 20)
    svc = SessionService(eng, store, batcher, limits)
    s, _ = await svc.create("me", prompt=[1, 2, 3])
    await svc.step("me", s.id, [4, 5])
    snap, at = await svc.snapshot("me", s.id)
    twin = await svc.restore("me", snap)
    await svc.rewind("me", s.id, 3)
    tokens = [g.token async for _, g in svc.generate("me", twin.id, [6], 4, seed=0)]
    await batcher.close()
    # the same stream through the Engine alone
    alone = list(eng.generate([1, 2, 3, 4, 5, 6], max_new_tokens=4, seed=0))
    return {"at": at, "rewound": s.position, "same": tokens == alone, "n": len(tokens)}


print(json.dumps(asyncio.run(main())))
"""


def test_sessions_run_in_process_with_grpc_and_torch_unimportable(toy_token_model):
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(toy_token_model["model_dir"]), json.dumps(BLOCKED)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"at": 5, "rewound": 3, "same": True, "n": 4}
