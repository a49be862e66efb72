"""Helpers of the reliability suite (tests/reliability): the toy models' reference, snapshot
decoding / forging, servers, calls (fault injection: tests/faults.py). Fixtures are in
conftest.py.

The suite runs real servers (in-process `BackgroundServer`, or `ServerProcess` subprocesses
from tests/runtime/grpc_helpers.py) on the hand-built toy models of tests/runtime/conftest.py
(`build_toy`): step.onnx + prefill.onnx + manifest.json for the recurrence

    x_t = a ⊙ x_{t-1} + E[u_t],   y_t = tanh(x_t) @ W          (S = 8, V = D = 11)

They build in milliseconds without torch, and come with `reference`, an independent float64
numpy implementation, so every output and every state the server reports (snapshots) is
checked against a second computation. The real torch export is covered by tests/runtime and
tests/export; nothing here depends on what the model computes beyond the recurrence contract.

Dimension letters: T inputs, S state size, D output width, V vocabulary.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.util
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

RUNTIME_TESTS = Path(__file__).resolve().parents[1] / "runtime"
if str(RUNTIME_TESTS) not in sys.path:
    sys.path.insert(0, str(RUNTIME_TESTS))  # grpc_helpers (ServerProcess, make_certs, scrape)


def _runtime_conftest():
    """tests/runtime/conftest.py as a module of its own name (for build_toy)."""
    name = "ssmstream_runtime_test_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RUNTIME_TESTS / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


build_toy = _runtime_conftest().build_toy

ATOL = RTOL = 1e-4  # ORT float32 vs the float64 reference over the short sequences used here
SNAP_HEAD = struct.Struct("<8sIQQH")  # documented in runtime/snapshots.py
SECRET = b"reliability-suite-snapshot-key"  # the --snapshot-key of the servers of `serve`
_KEY_FILE: list[Path] = []


# --- the independent computation ------------------------------------------------------------


class Ref:
    """One stream as the toy's numpy recurrence sees it: state x float64 [S] and position."""

    def __init__(self, toy: dict, state: np.ndarray | None = None, position: int = 0):
        self.toy = toy
        self.x = np.zeros(toy["S"]) if state is None else np.asarray(state, np.float64).copy()
        self.position = position

    def feed(self, inputs) -> np.ndarray:
        """Consume inputs (tokens [T] or values [T, d_in]); returns outputs float64 [T, D]."""
        u = np.asarray(inputs)
        if self.toy["kind"] == "tokens":
            u = u.astype(np.int64).reshape(1, -1)  # [1, T]
        else:
            u = u.astype(np.float32).reshape(1, -1, self.toy["d_in"])  # [1, T, d_in]
        y, x = self.toy["reference"](u, self.x[None])  # [1, T, D], [1, S]
        self.x, self.position = x[0], self.position + u.shape[1]
        return y[0]

    def peek(self, inputs) -> np.ndarray:
        """Outputs of `inputs` without consuming them."""
        return self.copy().feed(inputs)

    def copy(self) -> Ref:
        return Ref(self.toy, self.x, self.position)

    def greedy(self, prompt, n: int) -> list[int]:
        """Greedy decoding as Generate does it: feed prompt, then argmax / feed, n tokens."""
        r = self.copy()
        logits, tokens = r.feed(prompt)[-1], []
        for _ in range(n):
            tokens.append(int(np.argmax(logits)))
            logits = r.feed([tokens[-1]])[-1]
        return tokens


def decode_snapshot(data: bytes, secret: bytes | None = None) -> tuple[int, np.ndarray, str]:
    """SnapshotSession bytes → (position, state float32 [S], model sha), parsed per the
    format documented in runtime/snapshots.py (magic, version 2, S, position, sha, state,
    key id, HMAC-SHA256); the HMAC is checked when `secret` is given."""
    magic, version, S, position, sha_len = SNAP_HEAD.unpack_from(data)
    assert magic == b"SSMSNAP\0" and version == 2
    o = SNAP_HEAD.size
    assert len(data) == o + sha_len + 4 * S + 8 + 32, "snapshot length"
    if secret is not None:
        mac = hmac.new(secret, data[:-32], hashlib.sha256).digest()
        assert hmac.compare_digest(mac, data[-32:]), "snapshot signature"
    sha = data[o : o + sha_len].decode("ascii")
    state = np.frombuffer(data, dtype="<f4", count=S, offset=o + sha_len).astype(np.float32)
    return int(position), state, sha


def make_snapshot(
    position: int, state: np.ndarray, sha: str, version: int = 2, secret: bytes | None = SECRET
) -> bytes:
    """Snapshot bytes signed with `secret` (the servers' key: to forge well-formed but wrong
    snapshots), or with v1's plain sha256 checksum when secret is None."""
    s = sha.encode("ascii")
    state = np.asarray(state, dtype="<f4")  # [S]
    body = SNAP_HEAD.pack(b"SSMSNAP\0", version, state.shape[0], position, len(s)) + s
    body += state.tobytes()
    if secret is None:
        return body + hashlib.sha256(body).digest()
    body += hmac.new(secret, b"ssmstream snapshot key id", hashlib.sha256).digest()[:8]
    return body + hmac.new(secret, body, hashlib.sha256).digest()


def key_file() -> str:
    """A file holding SECRET, for --snapshot-key."""
    if not _KEY_FILE:
        import atexit
        import shutil
        import tempfile

        tmp = tempfile.mkdtemp(prefix="ssm-key-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        path = Path(tmp) / "snapshot.key"
        path.write_bytes(SECRET)
        _KEY_FILE.append(path)
    return str(_KEY_FILE[0])


def assert_matches(client_session, ref: Ref, atol: float = ATOL) -> None:
    """The server's snapshot of the session has the reference's position and state."""
    position, state, _ = decode_snapshot(client_session.snapshot())
    assert position == ref.position, (client_session.id, position, ref.position)
    np.testing.assert_allclose(state, ref.x, atol=atol, rtol=RTOL)


# --- servers and calls -------------------------------------------------------------------


@contextlib.contextmanager
def serve(model: dict, **overrides) -> Iterator:
    """A BackgroundServer (in this process, own event loop) on 127.0.0.1, ephemeral port."""
    from ssmstream.runtime.config import ServerConfig
    from ssmstream.runtime.server import BackgroundServer

    kw = dict(port=0, device="cpu", threads=1, grace=0.2, max_batch_delay=0.001)
    kw.update(overrides)
    if not kw.get("state_dir"):
        kw.setdefault("snapshot_key", key_file())
    cfg = ServerConfig(model_dir=str(model["model_dir"]), **kw)
    with BackgroundServer(cfg) as srv:
        yield srv


def target(srv) -> str:
    return f"127.0.0.1:{srv.port}"


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    """Call fn, which must fail with an RpcError; its (code, details)."""
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details() or ""


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll predicate() every 10 ms until it is true (or fail after timeout seconds)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def idle(srv) -> bool:
    """No Stream / Generate attached and nothing queued in the batcher."""
    service, batcher = srv.server.service, srv.server.batcher
    return service.attached == 0 and service.open_streams == 0 and batcher.pending() == 0
