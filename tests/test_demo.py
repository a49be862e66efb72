"""The demo's steps against the shipped checkpoint: serve → streamed generation → snapshot /
fork / restore → SIGTERM. Its workdir starts with the README tour's export of that checkpoint
(`shipped_export`, run and verified by the README's test): quickstart.py uses an export of the
same weights that passed its parity check, and the command it would export with is checked
below."""

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "examples" / "checkpoints" / "byte-lm"


@pytest.fixture(scope="module")
def demo(tmp_path_factory, shipped_export):
    workdir = tmp_path_factory.mktemp("demo")
    shutil.copytree(shipped_export, workdir / "model")
    cmd = [
        sys.executable, str(ROOT / "examples" / "quickstart.py"), "--workdir", str(workdir),
        "--max-new-tokens", "40",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    return workdir, proc


def test_shipped_checkpoint_loads_and_describes_itself():
    from ssmstream.model import load_checkpoint

    net = load_checkpoint(CKPT)
    assert net.cfg.vocab_size == 256 and not net.training
    lines = [json.loads(x) for x in (CKPT / "train_log.jsonl").read_text().splitlines()]
    evals = [x["eval"]["bpb"] for x in lines if "eval" in x]
    assert evals and evals[-1] < evals[0] and evals[-1] < 3.0  # it learned something
    assert "ssmstream train" in (CKPT / "COMMAND.txt").read_text()


def test_demo_runs_end_to_end(demo):
    workdir, proc = demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"== using the existing export of {CKPT} in {workdir / 'model'}" in proc.stdout
    assert "tokens/s" in proc.stderr  # generate --stats
    assert "all three continue identically (same sampling seed): True" in proc.stdout
    assert "server stopped (exit status 0)" in proc.stdout
    # the provider, and per batched step only a token and a slot in, the logits out
    assert "== provider: CPUExecutionProvider" in proc.stdout
    assert "moved 16 B in (input, slot) and 1,024 B out (outputs) per step" in proc.stdout
    # no process left behind: the port the server used is free again, its port file gone
    port = int(re.search(r"== serving on 127\.0\.0\.1:(\d+)", proc.stdout).group(1))
    assert not (workdir / "server.json").exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_stream_client_example_feeds_a_text_and_continues_it(demo, tmp_path):
    """examples/stream_client.py against a server of the demo's model: each byte fed with
    its top-3 guesses, then a continuation from the session and one from its fork."""
    workdir, _ = demo
    port_file = tmp_path / "port.json"
    server = subprocess.Popen(
        [sys.executable, "-m", "ssmstream.runtime.server", str(workdir / "model"), "--port", "0",
         "--port-file", str(port_file), "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_file.is_file():
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        port = json.loads(port_file.read_text())["port"]
        r = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "stream_client.py"), "--server",
             f"127.0.0.1:{port}", "--max-new-tokens", "8", "def f(x):"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("next: ") == len("def f(x):") - 1  # every byte but the last fed
    assert "--- session " in r.stdout and "--- fork " in r.stdout
    assert r.stdout.count("def f(x):") == 2


def test_demo_reuses_an_export_only_of_the_same_weights(demo, tmp_path, monkeypatch):
    """quickstart.py exports again when the export in its workdir came from other weights
    (a run with another --ckpt), not only when the checkpoint is newer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    workdir, _ = demo
    ran = []
    monkeypatch.setattr(quickstart, "run", ran.append)
    assert quickstart.export(CKPT, workdir / "model", 16) is False and ran == []
    other = tmp_path / "model"
    shutil.copytree(workdir / "model", other)
    m = json.loads((other / "manifest.json").read_text())
    m["source"]["weights_sha256"] = "0" * 64  # exported from another checkpoint
    (other / "manifest.json").write_text(json.dumps(m))
    assert quickstart.export(CKPT, other, 16) is True
    (cmd,) = ran
    assert cmd[3:] == ["export", str(CKPT), "--out", str(other), "--force", "--verify-steps", "16"]
