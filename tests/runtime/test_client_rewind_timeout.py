"""ClientSession.rewind(timeout=...) must use (and check) the per-call timeout, not
the client's default (the CLI's rewind after a cut relies on it to wait at most ~2 s)."""

from __future__ import annotations

import pytest
from grpc_helpers import serve, target
from ssmstream.runtime.client import Client


@pytest.fixture(scope="module")
def rewind_server(toy_token_model):
    with serve(toy_token_model["model_dir"], rewind_window=64) as s:
        yield s


def test_rewind_uses_its_own_timeout_not_the_clients(rewind_server, monkeypatch):
    with Client(target(rewind_server), timeout=30) as c:
        s = c.create_session()
        s.step(tokens=[1, 2, 3])
        seen = []
        real = c.stub.RewindSession

        def spy(req, **kw):
            seen.append(kw.get("timeout"))
            return real(req, **kw)

        monkeypatch.setattr(c.stub, "RewindSession", spy)
        assert s.rewind(2, timeout=2.5) == 2
        assert s.rewind(1) == 1
        assert seen == [2.5, 30]  # the call's own deadline, else the client's


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_rewind_refuses_a_non_positive_timeout(rewind_server, bad):
    with Client(target(rewind_server), timeout=30) as c:
        s = c.create_session()
        s.step(tokens=[1, 2])
        with pytest.raises(ValueError, match="^timeout: "):
            s.rewind(0, timeout=bad)
