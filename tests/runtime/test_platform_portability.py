"""The runtime off Linux (pyproject's Windows and macOS wheels), simulated here: names those
platforms lack are removed, a text-mode flag is added, an event loop without signal
handlers is used, and the edge API, the clients and the server are run as they would be."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pkgutil
import shutil
import signal
import subprocess
import sys

import numpy as np
import ssmstream.runtime
from ssmstream.runtime import secret_files
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.server import Server
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.snapshots import SnapshotKey

CHILD = r"""
import importlib, json, os, signal, sys

# what the libraries themselves need is loaded as they would load it on their platform
import asyncio, grpc, grpc.aio, numpy as np, onnxruntime, prometheus_client

# then the names that Windows (and, for some, macOS) lacks are taken away from our modules
GONE = {
    os: ["geteuid", "getuid", "getegid", "getgid", "getgroups", "sched_getaffinity",
         "O_NOFOLLOW", "O_CLOEXEC", "O_DIRECTORY", "fchmod", "fchown", "chown", "lchown",
         "setsid", "killpg", "getpgid", "getloadavg", "sysconf", "statvfs", "mkfifo", "pipe2",
         "posix_fadvise", "memfd_create"],
    signal: ["SIGHUP", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGKILL", "SIGALRM", "SIGQUIT",
             "SIGWINCH", "SIGCONT", "SIGSTOP", "SIGTSTP", "pthread_sigmask", "pthread_kill",
             "setitimer", "siginterrupt"],
}
for module, names in GONE.items():
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
for name in ("pwd", "grp", "fcntl", "resource", "termios"):
    sys.modules[name] = None  # `import pwd` now raises ImportError

modules, model_dir, state_dir = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
failed = {}
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as e:  # every module that fails, not just the first
        failed[name] = f"{type(e).__name__}: {e}"

from ssmstream.runtime import Engine, SessionStore
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.client import AsyncClient, Client
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.server import BackgroundServer
from ssmstream.runtime.service import ServiceLimits, SessionService
from ssmstream.runtime.snapshots import SnapshotKey

out = {"failed": failed}
eng = Engine(model_dir)  # "auto": asks whether CUDA is usable
out["generated"] = list(eng.generate([1, 2, 3], max_new_tokens=6, temperature=0.8, seed=0))
key = SnapshotKey.in_dir(state_dir)  # made here; its owner is not checked without user ids
store = SessionStore(eng.state_size, model_sha=eng.info["step_sha256"], snapshot_key=key)


async def in_process():
    batcher = Batcher(eng, store)
    await batcher.start()
    svc = SessionService(eng, store, batcher, ServiceLimits(rewind_window=64))
    s, _ = await svc.create("me", prompt=[1, 2, 3])
    await svc.step("me", s.id, [4, 5])
    snap, position = await svc.snapshot("me", s.id)
    again = await svc.restore("me", snap)
    tokens = [g.token async for _, g in svc.generate("me", again.id, [6], 4, seed=1)]
    await batcher.close()
    return s.id, position, tokens


sid, out["position"], out["tokens"] = asyncio.run(in_process())
store.save(state_dir)
loaded = SessionStore(eng.state_size, model_sha=eng.info["step_sha256"],
                      snapshot_key=SnapshotKey.in_dir(state_dir))
out["loaded"] = loaded.load(state_dir)
before, after = store.read(store.get(sid, "me")), loaded.read(loaded.get(sid, "me"))
out["same_state"] = bool((before == after).all())

with BackgroundServer(ServerConfig(model_dir=model_dir, port=0, device="cpu", grace=0.2)) as srv:
    target = f"127.0.0.1:{srv.port}"
    with Client(target) as c:
        s = c.create_session()
        out["client_position"] = s.step(tokens=[1, 2, 3]).position

    async def async_client():
        async with AsyncClient(target) as c:
            s = await c.create_session()
            return (await s.step(tokens=[1, 2])).position

    out["async_client_position"] = asyncio.run(async_client())
print(json.dumps(out))
"""


def runtime_modules() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(ssmstream.runtime.__path__)]
    return ["ssmstream.runtime", *(f"ssmstream.runtime.{n}" for n in sorted(names))]


def test_the_runtime_imports_and_the_edge_api_and_clients_work_without_posix_only_names(
    toy_token_model, tmp_path
):
    """Every runtime module imports, and an Engine, a SessionStore with its key and session
    file in a state directory, a SessionService, a BackgroundServer and both clients work,
    with os.geteuid, os.sched_getaffinity, pwd, fcntl, signal.SIGHUP and the other names
    Windows lacks gone (the server module read signal.SIGHUP as it was imported)."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(runtime_modules()),
         str(toy_token_model["model_dir"]), str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["failed"] == {}
    assert len(out["generated"]) == 6 and out["position"] == 5 and len(out["tokens"]) == 4
    assert out["loaded"] == 2 and out["same_state"]  # the session and its restored copy
    assert out["client_position"] == 3 and out["async_client_position"] == 2


_O_BINARY = 0x8000  # Windows' value


def test_the_session_file_and_the_key_are_written_in_binary_mode(monkeypatch, tmp_path):
    """On Windows os.open opens a file in text mode unless O_BINARY is given: each 0x0A
    byte written would become 0x0D 0x0A, and the signed session file would load as
    tampered with. Simulated: a platform with O_BINARY, where every file the store and
    the key open for writing must ask for it."""
    opened = []
    real_open = os.open

    def os_open(path, flags, mode=0o777, **kw):
        opened.append((os.path.basename(path), bool(flags & _O_BINARY)))
        return real_open(path, flags & ~_O_BINARY, mode, **kw)

    monkeypatch.setattr(os, "O_BINARY", _O_BINARY, raising=False)
    import ssmstream.runtime.sessions as sessions
    import ssmstream.runtime.snapshots as snapshots

    for module in (snapshots, sessions):  # as they read it at import on Windows
        monkeypatch.setattr(module, "O_BINARY", _O_BINARY, raising=False)
    monkeypatch.setattr(os, "open", os_open)
    state = tmp_path / "state"
    store = SessionStore(4, snapshot_key=SnapshotKey.in_dir(state))
    s = store.create()
    row = np.array([10.0, 0.1, 2.5, 13.0], np.float32)
    store.commit(s, row, 1)
    store.save(state)
    assert opened and all(binary for _, binary in opened), opened
    assert {name.split(".")[1] for name, _ in opened} == {"snapshot", "sessions"}
    loaded = SessionStore(4, snapshot_key=SnapshotKey.in_dir(state))
    assert loaded.load(state) == 1
    np.testing.assert_array_equal(loaded.read(loaded.get(s.id)), row)


def test_no_mode_warning_for_secret_files_on_windows(monkeypatch, tmp_path, caplog):
    """A file's mode on Windows is 0666 (0444 read-only) whoever may read it, so the warning
    would name every key file, with advice (chmod 600) that changes nothing there."""
    path = tmp_path / "snapshot.key"
    path.write_bytes(b"k" * 32)
    path.chmod(0o666)  # what os.stat says of any writable file on Windows
    with caplog.at_level(logging.WARNING, logger="ssmstream.runtime.secret_files"):
        secret_files.warn_unless_private(path, "snapshot key", "anyone may sign")
        assert "readable or writable by other users (mode 666)" in caplog.text  # here it means it
        caplog.clear()
        monkeypatch.setattr(sys, "platform", "win32")
        secret_files.warn_unless_private(path, "snapshot key", "anyone may sign")
    assert caplog.text == ""


def test_serve_stops_on_a_signal_where_the_event_loop_takes_no_signal_handlers(caplog):
    """Windows' event loops raise NotImplementedError from add_signal_handler: `serve` then
    takes the signal with signal.signal, stops as on POSIX, and puts the handlers back."""
    events = []

    class Stub(Server):  # what run() does around start and stop, not the serving itself
        async def start(self):
            events.append("start")
            asyncio.get_running_loop().call_later(0.01, signal.raise_signal, signal.SIGTERM)
            return 0

        async def stop(self, grace=None, save=True):
            events.append("stop")

    async def run():
        loop = asyncio.get_running_loop()

        def no_signal_handlers(sig, callback, *args):
            raise NotImplementedError

        loop.add_signal_handler = no_signal_handlers
        await asyncio.wait_for(Stub(ServerConfig(model_dir="unused")).run(), 10)

    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.INFO, logger="ssmstream.runtime.server"):
        asyncio.run(run())
    assert events == ["start", "stop"]
    assert "SIGTERM received" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_manifest_in_utf_8_opens_whatever_the_locale_encoding(toy_token_model, tmp_path):
    """manifest.json is JSON, so UTF-8 (a tool such as jq writes non-ASCII text as it is);
    read with the locale's encoding (Windows' cp1252, a C locale's ASCII) it is refused or
    misread. Simulated with an ASCII locale in a child process."""
    model_dir = tmp_path / "model"
    shutil.copytree(toy_token_model["model_dir"], model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["source"] = {"checkpoint": "/home/zoë/checkpoints/byte-lm"}
    text = json.dumps(manifest, ensure_ascii=False)
    (model_dir / "manifest.json").write_bytes(text.encode())
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = (
        "import json, locale, sys\n"
        "from ssmstream.runtime import Engine\n"
        "e = Engine(sys.argv[1], device='cpu')\n"
        "print(json.dumps([locale.getpreferredencoding(False), e.manifest['source']]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)], env=env, capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    encoding, source = json.loads(proc.stdout.decode().splitlines()[-1])
    assert encoding.lower() != "utf-8"  # the simulation holds
    assert source == {"checkpoint": "/home/zoë/checkpoints/byte-lm"}
