"""examples/quickstart.py, piece by piece with stand-ins (no export, no subprocess): how it
starts the server (loopback only, a fresh port file, giving up on a server that died), what it
keeps in its workdir, the sessions it closes, and the transfer report of a server that has
not stepped yet (an in-process toy server)."""

from __future__ import annotations

import json

import pytest
from scripts import load_script

build_toy = load_script("tests/runtime/conftest.py").build_toy
grpc_helpers = load_script("tests/runtime/grpc_helpers.py")


@pytest.fixture
def quick():
    return load_script("examples/quickstart.py")


class FakeServer:
    """A `subprocess.Popen` stand-in: writes its port file on its first poll() (as a real
    server does some time after launch), or exits at once when `dies`."""

    launched: list = []
    dies = False

    def __init__(self, cmd, stdout=None, stderr=None):
        FakeServer.launched.append(cmd)
        self.cmd = cmd
        self.returncode = None

    def poll(self):
        if FakeServer.dies:
            self.returncode = 1
            return 1
        port_file = self.cmd[self.cmd.index("--port-file") + 1]
        with open(port_file, "w") as f:
            json.dump({"port": 4242, "metrics_port": 4343, "pid": 1}, f)
        return None


@pytest.fixture
def fake_popen(quick, monkeypatch):
    FakeServer.launched, FakeServer.dies = [], False
    monkeypatch.setattr(quick.subprocess, "Popen", FakeServer)
    return FakeServer


def test_server_listens_on_loopback_and_reports_its_fresh_port(quick, fake_popen, tmp_path):
    """The server is bound to 127.0.0.1; the port read is the one this server wrote, not one
    left in server.json by an earlier run."""
    (tmp_path / "server.json").write_text(json.dumps({"port": 1111, "metrics_port": 1112}))
    proc, target, metrics_port = quick.start_server(tmp_path / "model", tmp_path, "cpu")
    (cmd,) = fake_popen.launched
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "0" and cmd[cmd.index("--device") + 1] == "cpu"
    assert (target, metrics_port) == ("127.0.0.1:4242", 4343)


def test_a_server_that_exits_at_once_is_reported_without_waiting(quick, fake_popen, monkeypatch,
                                                                  tmp_path):  # fmt: skip
    """A server process that has exited is noticed at the next poll: the script exits with
    a message naming the log, instead of waiting out the start deadline."""
    fake_popen.dies = True
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        assert len(sleeps) < 20, "kept waiting for a server that had exited"

    monkeypatch.setattr(quick.time, "sleep", sleep)
    with pytest.raises(SystemExit) as e:
        quick.start_server(tmp_path / "model", tmp_path, "cpu")
    assert e.value.code == f"the server did not start; see {tmp_path / 'server.log'}"
    assert sleeps == []


def test_sessions_of_a_reused_export_are_kept(quick, monkeypatch, tmp_path):
    """When the existing export is reused (same weights), the sessions saved with it stay."""
    work = tmp_path / "w"
    (work / "model").mkdir(parents=True)
    (work / "state").mkdir()
    (work / "state" / "old.snap").write_bytes(b"x")
    (work / "model" / "manifest.json").write_text(json.dumps({"input_kind": "tokens",
                                                              "vocab_size": 256}))  # fmt: skip

    class Proc:
        returncode = 0

    monkeypatch.setattr(quick, "export", lambda *a: False)  # reused
    monkeypatch.setattr(quick, "start_server", lambda *a: (Proc(), "127.0.0.1:1", 2))
    monkeypatch.setattr(quick.subprocess, "run", lambda *a, **k: None)
    monkeypatch.setattr(quick, "sessions_demo", lambda *a, **k: None)
    monkeypatch.setattr(quick, "transfer_report", lambda *a: None)
    monkeypatch.setattr(quick, "stop_server", lambda proc: None)
    assert quick.main(["--workdir", str(work)]) == 0
    assert (work / "state" / "old.snap").read_bytes() == b"x"


def test_sessions_demo_closes_parent_fork_and_restored(quick, monkeypatch, capsys):
    """Each of the three sessions the demo makes is closed once."""
    import ssmstream.runtime.client as client_mod

    closed = []

    class Token:
        token = ord("a")

    class Session:
        def __init__(self, sid):
            self.id, self.position = sid, 0

        def step(self, tokens):
            self.position += len(tokens)
            return self

        def snapshot(self):
            return b"snap"

        def fork(self):
            return Session("fork-0000")

        def generate(self, last, max_new_tokens, temperature, seed):
            return [Token()] * max_new_tokens

        def close(self):
            closed.append(self.id)
            return 0

    class Client:
        def __init__(self, target, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def create_session(self):
            return Session("parent-0")

        def restore(self, snap):
            return Session("restored")

    monkeypatch.setattr(client_mod, "Client", Client)
    quick.sessions_demo("127.0.0.1:1", "abcd", n=2)
    assert sorted(closed) == ["fork-0000", "parent-0", "restored"]


def test_transfer_report_before_any_step_and_after_three(quick, tmp_path, capsys):
    """A server that has not stepped yet gets the provider line only (no per-step figures);
    after three one-token steps of a 256-logit model: 3 steps, per step a token and a slot
    in (2 × int64) and 256 float32 logits out."""
    from ssmstream.runtime.client import Client

    toy = build_toy(tmp_path / "toy", "tokens", V=256, d_out=256)
    with grpc_helpers.serve(toy["model_dir"], metrics_port=0) as srv:
        target, metrics_port = grpc_helpers.target(srv), srv.server.metrics_port
        quick.transfer_report(target, metrics_port)
        out = capsys.readouterr().out
        assert "== provider: CPUExecutionProvider;" in out and "batched steps" not in out
        with Client(target, timeout=10) as c:
            s = c.create_session()
            with s.open_stream() as stream:
                for b in b"abc":
                    stream.send(tokens=[b])
            s.close()
        quick.transfer_report(target, metrics_port)
        out = capsys.readouterr().out
        assert "   3 batched steps moved 16 B in (input, slot) and 1,024 B out (outputs)" in out
