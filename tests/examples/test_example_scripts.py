"""examples/*.py, piece by piece: argument checks, printed values and control flow (the
scripts' end-to-end runs are in test_examples.py and test_edge_embed.py). Fast: no export, no
training; servers run hand-built toy models."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scripts import ROOT, load_script

build_toy = load_script("tests/runtime/conftest.py").build_toy
grpc_helpers = load_script("tests/runtime/grpc_helpers.py")
SIGNAL = ROOT / "examples" / "checkpoints" / "signal"
BYTE_LM = ROOT / "examples" / "checkpoints" / "byte-lm"


@pytest.fixture(scope="module")
def byte_server(tmp_path_factory):
    """A server of a hand-built byte-level token model (vocab 256), with metrics."""
    toy = build_toy(tmp_path_factory.mktemp("byte_toy"), "tokens", V=256, d_out=256)
    srv = grpc_helpers.ServerProcess(toy["model_dir"], "--device", "cpu", "--metrics-port", "0",
                                     workdir=tmp_path_factory.mktemp("srv"))  # fmt: skip
    srv.metrics_port = json.loads(srv.port_file.read_text())["metrics_port"]
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def small_vocab_toy(tmp_path_factory) -> dict:
    """A hand-built token model with a toy vocabulary (11 < 256)."""
    return build_toy(tmp_path_factory.mktemp("small_toy"), "tokens", V=11, d_out=11)


# --- plot_basis.py ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plot_mod():
    pytest.importorskip("torch")
    return load_script("examples/plot_basis.py")


def test_plot_basis_refuses_a_negative_layer(plot_mod, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        plot_mod.main([str(SIGNAL), "--out", str(tmp_path / "x.png"), "--layer", "-1"])
    assert e.value.code == 2
    assert "layer must be in [0, 2), got -1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_plot_basis_init_figure_same_axis_seeded_and_png_named(plot_mod, monkeypatch, tmp_path):
    import torch
    from ssmstream.model import SSMNetwork, load_checkpoint
    from ssmstream.model.plots import default_length

    drawn = []

    def fake_plot_layer(layer, path, head=0, length=None, title=""):
        drawn.append({"layer": layer, "path": Path(path), "head": head, "length": length})
        return Path(path)

    monkeypatch.setattr(plot_mod, "plot_layer", fake_plot_layer)
    torch.manual_seed(123)  # whatever the global RNG holds, the init figure is seed 5's
    paths = plot_mod.plot_basis(SIGNAL, tmp_path / "basis", layer=1, head=2, seed=5)
    assert [p.name for p in paths] == ["basis", "basis_init.png"]
    trained, init = drawn
    assert (trained["head"], trained["length"]) == (2, None)
    net = load_checkpoint(SIGNAL)
    # the init figure shares the trained layer's time axis
    assert init["length"] == default_length(net.ssms[1], 2) and init["head"] == 2
    torch.manual_seed(5)
    want = SSMNetwork(net.cfg).eval().ssms[1].state_dict()
    got = init["layer"].state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


# --- edge_embed.py -----------------------------------------------------------------------------


def test_edge_embed_maps_bytes_into_a_toy_vocabulary(small_vocab_toy):
    from ssmstream.runtime import Engine

    edge = load_script("examples/edge_embed.py")
    text = "hello world"
    got = edge.run_tokens(Engine(small_vocab_toy["model_dir"], device="cpu", threads=1), text,
                          6, 0.0, 0)  # fmt: skip
    fresh = Engine(small_vocab_toy["model_dir"], device="cpu", threads=1)
    want = list(fresh.generate([b % 11 for b in text.encode()], max_new_tokens=6,
                               temperature=0.0, seed=0))  # fmt: skip
    assert got == want and len(got) == 6


# --- rescale_dt.py ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rescale_mod():
    pytest.importorskip("torch")
    return load_script("examples/rescale_dt.py")


def test_rescale_config_refuses_no_signals(rescale_mod):
    with pytest.raises(ValueError, match=r"^signals must be at least 1, got 0$"):
        rescale_mod.RescaleConfig(signals=0)
    assert rescale_mod.RescaleConfig(signals=1).signals == 1


def test_rescale_refuses_a_signal_checkpoint_without_its_signal_config(rescale_mod, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"train": {"task": "signal"}}))
    with pytest.raises(ValueError, match=r"was not trained on the signal task"):
        rescale_mod.training_signal(tmp_path)


def test_rescale_reuses_only_a_matching_passing_export(rescale_mod, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    model = tmp_path / "model"
    model.mkdir()

    def manifest(**kw):
        m = {"dt_scale": 0.5, "source": {"weights_sha256": sha}, "graphs": {"step": {}},
             "parity": {"passed": True}}  # fmt: skip
        m.update(kw)
        (model / "manifest.json").write_text(json.dumps(m))

    reusable = rescale_mod.reusable
    manifest()
    assert reusable(model, ckpt, 0.5, False) is True
    assert reusable(model, ckpt, 1.0, False) is False  # another dt_scale
    assert reusable(model, ckpt, 0.5, True) is False  # prefill wanted, none exported
    manifest(graphs={"step": {}, "prefill": {}})
    assert reusable(model, ckpt, 0.5, True) is True
    assert reusable(model, ckpt, 0.5, False) is False
    manifest(parity={"passed": False})
    assert reusable(model, ckpt, 0.5, False) is False  # a failed parity check
    manifest(parity={})
    assert reusable(model, ckpt, 0.5, False) is True  # not verified (--no-verify): reusable
    manifest(source={"weights_sha256": "0" * 64})
    assert reusable(model, ckpt, 0.5, False) is False


def test_rescale_report_lines(rescale_mod):
    res = {"rate": 8, "factor": 2.0, "dt_scale": 0.5, "signals": 3, "samples_r": 256,
           "samples_cr": 512, "target_power": 2.0, "mse_r": 0.01, "mse_cr_rescaled": 0.02,
           "mse_cr_unscaled": 0.5, "rescaled_over_r": 2.0, "unscaled_over_rescaled": 25.0,
           "gap_rescaled": 1e-3, "gap_unscaled": 0.2}  # fmt: skip
    lines = rescale_mod.report(res).splitlines()
    assert (
        lines[0] == "3 held-out signals, target power 2.0000; 256 samples at rate 8, 512 at rate 16"
    )
    rows = {ln[:36].strip(): ln[36:].split() for ln in lines[3:6]}
    assert rows == {
        "model_r  (dt_scale 1)": ["8", "1.00e-02", "5.00e-03"],
        "model_cr (dt_scale 0.5)": ["16", "2.00e-02", "1.00e-02"],
        "model_r  (dt_scale 1), unscaled": ["16", "5.00e-01", "2.50e-01"],
    }
    assert "MSE rescaled at 2r / MSE at r:  2.00×" in lines
    assert "MSE unscaled / rescaled at 2r:  25.0×" in lines
    assert lines[-1] == "|out_2r[::2] − out_r|² / power:  rescaled 1.0e-03, unscaled 2.0e-01"


def test_rescale_gap_only_for_an_integer_factor(rescale_mod, monkeypatch, tmp_path):
    """The shared-sample gap needs sample c·k of the c·r signal to be sample k of the r one:
    computed for factor 2, left out for 2.5 (whose 2.5·L samples have no such alignment)."""

    def fake_export(ckpt, out, **kw):
        Path(out).mkdir(parents=True, exist_ok=True)
        return Path(out)

    monkeypatch.setattr(rescale_mod, "Engine", IdentityEngine)
    monkeypatch.setattr(rescale_mod, "export_model", fake_export)
    res = rescale_mod.run(rescale_mod.RescaleConfig(factor=2.0, signals=2, work=str(tmp_path)))
    assert res["samples_cr"] == 2 * res["samples_r"] and "gap_rescaled" in res
    res = rescale_mod.run(rescale_mod.RescaleConfig(factor=2.5, signals=2, work=str(tmp_path)))
    assert "gap_rescaled" not in res and "gap_unscaled" not in res
    assert res["dt_scale"] == 0.4 and res["samples_cr"] == int(2.5 * res["samples_r"])


# --- quickstart.py -----------------------------------------------------------------------------


@pytest.fixture
def quick():
    return load_script("examples/quickstart.py")


def test_quickstart_exports_again_unless_the_export_is_whole_and_passed(quick, monkeypatch,
                                                                          tmp_path):  # fmt: skip
    """An export of these weights that passed parity is reused; one that failed parity, or
    whose graph no longer matches its manifest's sha256 (the server would refuse it), is
    exported again."""
    ran = []
    monkeypatch.setattr(quick, "run", ran.append)
    model = tmp_path / "model"
    build_toy(model, "tokens", V=256, d_out=256)
    m = json.loads((model / "manifest.json").read_text())
    sha = hashlib.sha256((BYTE_LM / "model.safetensors").read_bytes()).hexdigest()
    m.update(source={"weights_sha256": sha}, parity={"passed": True})
    (model / "manifest.json").write_text(json.dumps(m))
    assert quick.export(BYTE_LM, model, 16) is False and ran == []
    m["parity"]["passed"] = False
    (model / "manifest.json").write_text(json.dumps(m))
    assert quick.export(BYTE_LM, model, 16) is True and len(ran) == 1
    m["parity"]["passed"] = True
    (model / "manifest.json").write_text(json.dumps(m))
    step = model / m["graphs"]["step"]["file"]
    step.write_bytes(step.read_bytes()[: step.stat().st_size // 2])  # a truncated copy
    assert quick.export(BYTE_LM, model, 16) is True and len(ran) == 2


def test_quickstart_refuses_a_ckpt_without_weights(quick, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(quick, "run", lambda *a, **k: pytest.fail("ran a command"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        quick.main(["--ckpt", str(tmp_path / "empty"), "--workdir", str(tmp_path / "w")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--ckpt: {tmp_path / 'empty'} has no model.safetensors" in err


def test_quickstart_refuses_a_non_byte_model_after_dropping_stale_sessions(
    quick, monkeypatch, tmp_path, capsys
):
    work = tmp_path / "w"
    (work / "model").mkdir(parents=True)
    (work / "state").mkdir()
    (work / "state" / "old.snap").write_bytes(b"x")
    (work / "model" / "manifest.json").write_text(json.dumps({"input_kind": "tokens",
                                                              "vocab_size": 100}))  # fmt: skip
    monkeypatch.setattr(quick, "export", lambda ckpt, model_dir, steps: True)  # a new export
    monkeypatch.setattr(quick, "start_server", lambda *a: pytest.fail("started a server"))
    with pytest.raises(SystemExit) as e:
        quick.main(["--workdir", str(work)])
    assert e.value.code == 2
    assert "needs a byte-level token model (vocab 256)" in capsys.readouterr().err
    assert not (work / "state").exists()  # another model's sessions are gone


@pytest.mark.parametrize("server_rc, want", [(0, 0), (1, 1)])
def test_quickstart_exit_status_is_the_server_s(quick, monkeypatch, tmp_path, capsys, server_rc,
                                                want):  # fmt: skip
    work = tmp_path / "w"
    (work / "model").mkdir(parents=True)
    (work / "model" / "manifest.json").write_text(json.dumps({"input_kind": "tokens",
                                                              "vocab_size": 256}))  # fmt: skip

    class Proc:
        returncode = server_rc

    monkeypatch.setattr(quick, "export", lambda *a: False)
    monkeypatch.setattr(quick, "start_server", lambda *a: (Proc(), "127.0.0.1:1", 2))
    monkeypatch.setattr(quick, "run", lambda *a, **k: None)
    monkeypatch.setattr(quick, "sessions_demo", lambda *a, **k: None)
    monkeypatch.setattr(quick, "transfer_report", lambda *a: None)
    monkeypatch.setattr(quick, "stop", lambda proc: None)
    assert quick.main(["--workdir", str(work)]) == want
    assert f"server stopped (exit status {server_rc})" in capsys.readouterr().out


class _Gen:
    def __init__(self, token):
        self.token = token


def _fake_client(log: dict, diverge: bool):
    class Session:
        n = 0

        def __init__(self, name):
            Session.n += 1
            self.name, self.id, self.position = name, f"{name}-{Session.n:08d}", 0

        def step(self, tokens):
            log.setdefault("stepped", []).append(list(tokens))
            self.position += len(tokens)
            return self

        def snapshot(self):
            return b"snapshot"

        def fork(self):
            return Session("fork")

        def generate(self, last, max_new_tokens, temperature, seed):
            log.setdefault("generate", []).append(list(last))
            tok = ord("X") if (diverge and self.name == "fork") else ord("a")
            return [_Gen(tok)] * max_new_tokens

        def close(self):
            log.setdefault("closed", []).append(self.name)

    class Client:
        def __init__(self, target, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def create_session(self):
            return Session("parent")

        def restore(self, snap):
            assert snap == b"snapshot"
            return Session("restored")

    return Client


def test_quickstart_sessions_demo_prefills_all_but_the_last_byte(quick, monkeypatch, capsys):
    import ssmstream.runtime.client as client_mod

    log = {}
    monkeypatch.setattr(client_mod, "Client", _fake_client(log, diverge=False))
    quick.sessions_demo("127.0.0.1:1", "abcd", n=3)
    assert log["stepped"] == [[97, 98, 99]]  # the prompt but its last byte
    assert log["generate"] == [[100]] * 3  # each continuation starts from that byte
    out = capsys.readouterr().out
    assert "prefilled 3 bytes of the prompt" in out
    assert "all three continue identically (same sampling seed): True" in out


def test_quickstart_sessions_demo_fails_when_they_diverge(quick, monkeypatch, capsys):
    import ssmstream.runtime.client as client_mod

    monkeypatch.setattr(client_mod, "Client", _fake_client({}, diverge=True))
    with pytest.raises(SystemExit) as e:
        quick.sessions_demo("127.0.0.1:1", "abcd", n=3)
    assert e.value.code == "snapshot/fork/restore diverged"
    assert "continue identically (same sampling seed): False" in capsys.readouterr().out


# --- stream_client.py ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sc():
    return load_script("examples/stream_client.py")


def test_stream_client_show(sc):
    assert [sc.show(b) for b in (31, 32, 126, 127, 0xFF)] == ["0x1f", "' '", "'~'", "0x7f", "0xff"]


def test_stream_client_refuses_a_one_byte_text_before_making_a_session(sc, byte_server, capsys):
    """The usage error comes before CreateSession: no session is left on the server."""

    def active():
        return grpc_helpers.scrape(byte_server.metrics_port)["ssmstream_sessions_active"]

    before = active()
    with pytest.raises(SystemExit) as e:
        sc.main(["x", "--server", byte_server.address])
    assert e.value.code == 2 and "text: give at least two bytes" in capsys.readouterr().err
    assert active() == before


def test_stream_client_prints_probabilities_and_two_seeds(sc, byte_server, capsys, caplog):
    caplog.set_level("INFO", logger="stream_client")
    assert sc.main(["abc", "--server", byte_server.address, "--max-new-tokens", "3",
                    "--seed", "5"]) == 0  # fmt: skip
    fed = [r.getMessage() for r in caplog.records if "next: " in r.getMessage()]
    assert len(fed) == 2
    for line in fed:
        probs = [float(p) for p in re.findall(r" (\d+\.\d\d)(?:,|$)", line.split("next: ")[1])]
        assert len(probs) == 3 and all(0 <= p <= 1 for p in probs), line
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 0.02, line
    out = capsys.readouterr().out
    assert re.search(r"^--- session \S+ \(seed 5\) ---$", out, re.M)
    assert re.search(r"^--- fork \S+ \(seed 6\) ---$", out, re.M)


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
    monkeypatch.setattr(quick, "run", lambda *a, **k: None)
    monkeypatch.setattr(quick, "sessions_demo", lambda *a, **k: None)
    monkeypatch.setattr(quick, "transfer_report", lambda *a: None)
    monkeypatch.setattr(quick, "stop", lambda proc: None)
    assert quick.main(["--workdir", str(work)]) == 0
    assert (work / "state" / "old.snap").read_bytes() == b"x"


def test_sessions_demo_closes_parent_fork_and_restored(quick, monkeypatch):
    """Each of the three sessions the demo makes is closed once."""
    import ssmstream.runtime.client as client_mod

    log = {}
    monkeypatch.setattr(client_mod, "Client", _fake_client(log, diverge=False))
    quick.sessions_demo("127.0.0.1:1", "abcd", n=2)
    assert sorted(log["closed"]) == ["fork", "parent", "restored"]


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


class IdentityEngine:
    """y = u, stateless: the outputs are the input samples themselves."""

    d_output = 1
    manifest = {"parity": {"passed": True}}

    def __init__(self, model_dir, device="cpu", threads=None):
        pass

    def new_state(self, B=1):
        return np.zeros((B, 1), np.float32)

    def step(self, u, s):
        return np.asarray(u, np.float32)[:, :1], s


@pytest.fixture
def exports(rescale_mod, monkeypatch) -> list[dict]:
    """export_model replaced by one that writes a manifest `reusable` accepts; returns the
    calls made."""
    calls = []
    weights = hashlib.sha256((SIGNAL / "model.safetensors").read_bytes()).hexdigest()

    def fake_export(ckpt, out, dt_scale=1.0, prefill=True, **kw):
        calls.append({"out": Path(out), "dt_scale": dt_scale})
        Path(out).mkdir(parents=True, exist_ok=True)
        m = {"dt_scale": dt_scale, "source": {"weights_sha256": weights},
             "graphs": {"step": {}, **({"prefill": {}} if prefill else {})},
             "parity": {"passed": True}}  # fmt: skip
        (Path(out) / "manifest.json").write_text(json.dumps(m))
        return Path(out)

    monkeypatch.setattr(rescale_mod, "Engine", IdentityEngine)
    monkeypatch.setattr(rescale_mod, "export_model", fake_export)
    return calls


def _signals(rescale_mod, rate_factor: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from ssmstream.model.data import signal_batch

    sig = rescale_mod.training_signal(SIGNAL)
    sig = dataclasses.replace(sig, rate=sig.rate * rate_factor)
    u, y = signal_batch(sig, n, torch.Generator().manual_seed(seed))
    return u.numpy().astype(np.float64), y.numpy().astype(np.float64)


def test_errors_are_relative_to_the_target_power(rescale_mod, exports, tmp_path):
    """target_power is the mean square of the target at rate r (not of the input), and the
    MSEs are those of the outputs (here the inputs) against the targets."""
    res = rescale_mod.run(rescale_mod.RescaleConfig(factor=2.0, signals=3, seed=7,
                                                    work=str(tmp_path)))  # fmt: skip
    u_r, y_r = _signals(rescale_mod, 1.0, 3, 7)
    u_cr, y_cr = _signals(rescale_mod, 2.0, 3, 7)
    assert res["target_power"] == pytest.approx(np.mean(y_r**2), rel=1e-9)
    assert res["target_power"] != pytest.approx(np.mean(u_r**2), rel=1e-3)
    assert res["mse_r"] == pytest.approx(np.mean((u_r - y_r) ** 2), rel=1e-9)
    assert res["mse_cr_rescaled"] == pytest.approx(np.mean((u_cr - y_cr) ** 2), rel=1e-9)


def test_the_gap_compares_the_samples_the_two_rates_share(rescale_mod, exports, tmp_path):
    """Sample c·k at rate c·r is taken at the time of sample k at rate r: an output that
    only depends on the current input (y = u) has no gap at all, and the factor-2 signal's
    every other sample is exactly the rate-r signal."""
    u_r, _ = _signals(rescale_mod, 1.0, 2, 12345)
    u_cr, _ = _signals(rescale_mod, 2.0, 2, 12345)
    assert np.array_equal(u_cr[:, ::2], u_r)  # the premise: shared sample times
    res = rescale_mod.run(rescale_mod.RescaleConfig(factor=2.0, signals=2, work=str(tmp_path)))
    assert res["gap_rescaled"] == 0.0 and res["gap_unscaled"] == 0.0


def test_an_export_is_reused_only_when_asked(rescale_mod, exports, tmp_path):
    """Without reuse both models are exported again even when `work` holds matching
    exports; with reuse, matching exports are not redone."""
    cfg = dict(factor=2.0, signals=1, work=str(tmp_path))
    rescale_mod.run(rescale_mod.RescaleConfig(**cfg))
    assert [c["dt_scale"] for c in exports] == [1.0, 0.5]
    rescale_mod.run(rescale_mod.RescaleConfig(**cfg))  # reuse=False (the default)
    assert [c["dt_scale"] for c in exports] == [1.0, 0.5, 1.0, 0.5]
    rescale_mod.run(rescale_mod.RescaleConfig(**cfg, reuse=True))
    assert len(exports) == 4


def test_a_corrupt_manifest_is_not_reusable(rescale_mod, tmp_path):
    """A manifest.json that is not JSON (an interrupted export) means: export again."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text('{"dt_scale": 0.5, "source": {')
    assert rescale_mod.reusable(model, ckpt, 0.5, False) is False


def test_json_flag_prints_the_returned_numbers(rescale_mod, monkeypatch, capsys):
    """--json prints exactly the dict main returns, as JSON; without it, the report."""
    res = {
        "rate": 8, "factor": 2.0, "dt_scale": 0.5, "signals": 3, "samples_r": 256,
        "samples_cr": 512, "target_power": 2.0, "mse_r": 0.01, "mse_cr_rescaled": 0.02,
        "mse_cr_unscaled": 0.5, "rescaled_over_r": 2.0, "unscaled_over_rescaled": 25.0,
    }  # fmt: skip
    monkeypatch.setattr(rescale_mod, "run", lambda cfg: dict(res))
    assert rescale_mod.main(["--json"]) == res
    assert json.loads(capsys.readouterr().out) == res
    rescale_mod.main([])
    out = capsys.readouterr().out
    assert out.startswith("3 held-out signals, target power 2.0000; ")


# --- every example's --help ------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, said",
    [
        ("examples/quickstart.py", "tokens to generate (default: 200)"),
        ("examples/edge_embed.py", "tokens to generate (default: 80)"),
        ("examples/stream_client.py", "server host:port (default: 127.0.0.1:50051)"),
    ],
)
def test_an_examples_help_states_the_defaults_below_its_docstring_as_written(script, said, capsys):
    module = load_script(script)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and said in " ".join(out.split())
    indented = [ln for ln in module.__doc__.splitlines() if ln.startswith("    ")]
    assert indented and all(ln in out.splitlines() for ln in indented)  # commands, code: kept
