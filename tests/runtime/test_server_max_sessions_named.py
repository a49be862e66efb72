"""A `--max-sessions` whose state slab cannot be allocated is refused naming the flag and the
bytes it needs, not the slab's own argument (`capacity`, which the slab names when it turns
numpy's MemoryError into InvalidInput)."""

from __future__ import annotations

import logging

import pytest
import ssmstream.runtime.slab as slab
from ssmstream.runtime import server
from ssmstream.runtime.errors import InvalidInput

pytestmark = pytest.mark.timeout(120)


def test_a_slab_too_large_to_allocate_names_max_sessions(tiny_token_model, monkeypatch, caplog):
    def no_memory(shape, dtype, field):  # what zeros() raises for numpy's MemoryError
        raise InvalidInput(field, f"an array of {shape[0]} × {shape[1]} cannot be allocated")

    monkeypatch.setattr(slab, "zeros", no_memory)
    argv = [str(tiny_token_model["model_dir"]), "--port", "0", "--device", "cpu",
            "--max-sessions", "1000"]  # fmt: skip
    with caplog.at_level(logging.ERROR, logger="ssmstream.runtime.server"):
        assert server.main(argv) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert message.startswith("ssmstream serve: --max-sessions: 1000 sessions need ")
    assert "too many" in message and "capacity" not in message
