"""ssmstream.runtime — onnxruntime serving and edge embedding; never imports torch.

    from ssmstream.runtime import Engine, SessionStore, Batcher
    eng = Engine("model/")                      # an exported model directory
    s = eng.new_state()                         # float32 [1, S]
    out, s = eng.step(np.array([tok]), s)       # one token -> logits [1, V]

Modules: engine (Engine, StepBuffers), slab (StateSlab: every session's state on the engine's
device), sessions (SessionStore, Session), batcher (Batcher), service (SessionService,
ServiceLimits: the server's session operations in-process, without gRPC), snapshots
(SnapshotKey: signs snapshots; `SnapshotKey.in_dir` keeps one across restarts),
sampling (sample, Sampler, SamplingConfig), errors, manifest; the gRPC server, servicer and
client (Client, AsyncClient) sit on top of these. Names are imported lazily, so
`import ssmstream.runtime.cli` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers see of the names imported lazily below
    from .batcher import Batcher as Batcher
    from .engine import Engine as Engine
    from .engine import StepBuffers as StepBuffers
    from .sampling import Sampler as Sampler
    from .sampling import SamplingConfig as SamplingConfig
    from .sampling import sample as sample
    from .sessions import Session as Session
    from .sessions import SessionStore as SessionStore
    from .slab import StateSlab as StateSlab

_EXPORTS = {
    "Engine": "engine",
    "StepBuffers": "engine",
    "StateSlab": "slab",
    "SessionStore": "sessions",
    "Session": "sessions",
    "Batcher": "batcher",
    "Sampler": "sampling",
    "SamplingConfig": "sampling",
    "sample": "sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ssmstream.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
