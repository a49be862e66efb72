"""Output a text stdout cannot encode (a non-UTF-8 locale, PYTHONIOENCODING=ascii) is escaped
by every command, not a traceback (`info` of a model named in another script) nor a usage
error (`generate`, whose ValueError handler would take a UnicodeEncodeError for a bad flag)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from ssmstream.runtime import cli


def test_run_command_escapes_what_stdout_cannot_encode(monkeypatch):
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii")
    monkeypatch.setattr(sys, "stdout", out)

    def run():
        sys.stdout.write("mod\u00e8le \ufffd\n")
        return 0

    assert cli.run_command(run, "x") == 0
    assert raw.getvalue() == b"mod\\xe8le \\ufffd\n"


def test_generate_text_on_an_ascii_stdout_is_not_a_usage_error(make_toy, tmp_path):
    """A byte-level model sampling bytes >= 128 (hot temperature): `ssmstream generate` on an
    ASCII stdout prints them escaped and exits 0, without its usage."""
    from ssmstream.runtime.config import ServerConfig
    from ssmstream.runtime.server import BackgroundServer

    toy = make_toy(tmp_path / "bytes", "tokens", V=256, d_out=256)
    cfg = ServerConfig(model_dir=str(toy["model_dir"]), port=0, device="cpu", grace=0.2)
    with BackgroundServer(cfg) as srv:
        cmd = [sys.executable, "-m", "ssmstream.runtime.cli", "generate", "--server",
               f"127.0.0.1:{srv.port}", "--ids", "200", "--max-new-tokens", "40",
               "--temperature", "50", "--seed", "0"]  # fmt: skip
        ids = subprocess.run(cmd, capture_output=True, timeout=60, check=True).stdout.split()
        assert any(int(t) >= 128 for t in ids)  # the text below has something to escape
        env = {**os.environ, "PYTHONIOENCODING": "ascii"}
        text = [a for a in cmd if a != "--ids"]
        text[text.index("200")] = os.fsdecode(bytes([200]))
        p = subprocess.run(text, capture_output=True, timeout=60, env=env)
    assert (p.returncode, b"usage:" in p.stderr) == (0, False), p.stderr.decode()
    assert p.stdout.isascii() and b"\\ufffd" in p.stdout
