"""What survives a server process's death: SIGTERM under load, SIGKILL with --save-interval,
a save torn by a kill, a corrupt state file; saves that overlap.

Servers run as real subprocesses (`ServerProcess`, tests/runtime/grpc_helpers.py); every
session's persisted state is checked against the float64 reference of the toy model at the
position the restarted server reports, and the restarted stream must continue exactly.

Dimension letters: S state size (8), V vocabulary (11).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_helpers import ServerProcess
from rel_helpers import Ref, code_of, decode_snapshot
from ssmstream.runtime.client import Client
from ssmstream.runtime.sessions import STORE_FILE, SessionStore
from ssmstream.runtime.snapshots import SnapshotKey

ALICE, BOB = "tok-alice-5d1c0e9b", "tok-bob-c4a0e27f"
WRONG = "tok-wrong-0f9e8d7c"


def token_seq(i: int, n: int, V: int = 11) -> list[int]:
    return np.random.default_rng(1000 + i).integers(0, V, size=n).tolist()


def reference_at(toy: dict, tokens: list[int]) -> Ref:
    r = Ref(toy)
    if tokens:
        r.feed(tokens)
    return r


def check_continues(toy, c: Client, sid: str, tokens: list[int], extra: int = 4) -> int:
    """The session's persisted state equals the reference at its position, and feeding the
    next `extra` inputs over a new Stream gives the reference outputs. Returns the position."""
    s = c.session(sid)
    position, state, _ = decode_snapshot(s.snapshot())
    ref = reference_at(toy, tokens[:position])
    np.testing.assert_allclose(state, ref.x, atol=1e-4, rtol=1e-4)
    nxt = tokens[position : position + extra]
    with s.open_stream() as st:
        got = [st.send(tokens=[t]).outputs[0] for t in nxt]
    np.testing.assert_allclose(np.stack(got), ref.feed(nxt), atol=1e-4, rtol=1e-4)
    assert s.position == position + len(nxt)
    return position


# --- SIGTERM under load -----------------------------------------------------------------------


class Streamer(threading.Thread):
    """Streams `tokens` to one session one request at a time until the server goes away;
    records every acknowledged response."""

    def __init__(self, address: str, sid: str, tokens: list[int]):
        super().__init__(daemon=True)
        self.address, self.sid, self.tokens = address, sid, tokens
        self.acked: list = []  # StepResult per acknowledged request
        self.error: grpc.StatusCode | None = None

    def run(self) -> None:
        with Client(self.address, token=ALICE, timeout=30) as c:
            try:
                with c.session(self.sid).open_stream() as st:
                    for t in self.tokens:
                        self.acked.append(st.send(tokens=[t]))
            except grpc.RpcError as e:
                self.error = e.code()


def test_sigterm_under_load_persists_every_acknowledged_step(toy, tmp_path):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"{ALICE} alice\n{BOB} bob\n")
    args = (
        "--state-dir", str(tmp_path / "state"), "--device", "cpu", "--threads", "1",
        "--grace", "5", "--auth-tokens", str(tokens_file), "--log-level", "DEBUG",
    )  # fmt: skip
    n_sessions, n_tokens = 12, 2000
    seqs = [token_seq(i, n_tokens) for i in range(n_sessions)]
    first = ServerProcess(toy["model_dir"], *args, workdir=tmp_path)
    try:
        with Client(first.address, token=ALICE, timeout=30) as c:
            ids = [c.create_session(session_id=f"load-{i}").id for i in range(n_sessions)]
            with Client(first.address, token=WRONG, timeout=30) as intruder:
                assert code_of(intruder.info)[0] == grpc.StatusCode.UNAUTHENTICATED
        streamers = [Streamer(first.address, sid, seq) for sid, seq in zip(ids, seqs)]
        for s in streamers:
            s.start()
        deadline = time.monotonic() + 60
        while min(len(s.acked) for s in streamers) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.terminate() == 0  # SIGTERM while all 12 are streaming
        for s in streamers:
            s.join(30)
    finally:
        first.kill()
    out = first.output()
    assert f"saved {n_sessions} sessions" in out, out[-2000:]
    for s in streamers:
        assert s.error == grpc.StatusCode.UNAVAILABLE, (s.sid, s.error)
        assert 20 <= len(s.acked) < n_tokens
        assert [r.position for r in s.acked] == list(range(1, len(s.acked) + 1))
        want = Ref(toy).feed(s.tokens[: len(s.acked)])  # every acknowledged output was right
        np.testing.assert_allclose(
            np.stack([r.outputs[0] for r in s.acked]), want, atol=1e-4, rtol=1e-4
        )

    second = ServerProcess(toy["model_dir"], *args, workdir=tmp_path)
    try:
        with Client(second.address, token=ALICE, timeout=30) as c:
            with Client(second.address, token=BOB, timeout=30) as bob:  # still alice's only
                code, msg = code_of(lambda: bob.session(ids[0]).step(tokens=[1]))
                assert code == grpc.StatusCode.NOT_FOUND and "unknown" in msg
            for s in streamers:
                position = check_continues(toy, c, s.sid, s.tokens)
                # every acknowledged step is persisted; nothing beyond what was sent
                assert position == len(s.acked), (s.sid, position, len(s.acked))
        assert second.terminate() == 0
    finally:
        second.kill()
    assert f"restored {n_sessions} sessions" in second.output()
    for log_text in (out, second.output()):  # DEBUG logs of both runs
        for secret in (ALICE, BOB, WRONG):
            assert secret not in log_text, "a bearer token was logged"


# --- SIGKILL, periodic saves, torn files --------------------------------------------------------


def saved_positions(state_dir, toy) -> dict[str, int]:
    """Positions in state_dir/sessions.bin as a fresh store loads them ({} if none/unreadable)."""
    try:
        store = SessionStore(
            toy["S"], 64, model_sha=_sha(toy), snapshot_key=SnapshotKey.in_dir(state_dir)
        )
        store.load(state_dir)
    except ValueError:  # being replaced right now: try again later
        return {}
    return {s.id: s.position for s in store.sessions()}


def _sha(toy) -> str:
    import json

    return json.loads((toy["model_dir"] / "manifest.json").read_text())["graphs"]["step"]["sha256"]


def test_sigkill_loses_at_most_the_steps_since_the_last_periodic_save(toy, tmp_path):
    state_dir = tmp_path / "state"
    args = ("--state-dir", str(state_dir), "--save-interval", "0.3", "--device", "cpu",
            "--threads", "1")  # fmt: skip
    seqs = {f"kill-{i}": token_seq(50 + i, 40) for i in range(3)}
    srv = ServerProcess(toy["model_dir"], *args, workdir=tmp_path)
    try:
        with Client(srv.address, timeout=30) as c:
            for sid, seq in seqs.items():
                c.create_session(session_id=sid).step(tokens=seq[:6])
            deadline = time.monotonic() + 20
            while saved_positions(state_dir, toy) != {sid: 6 for sid in seqs}:
                assert time.monotonic() < deadline, "no periodic save seen"
                time.sleep(0.05)
            for sid, seq in seqs.items():  # acknowledged, maybe not saved yet
                c.session(sid).step(tokens=seq[6:10])
            c.create_session(session_id="late").step(tokens=[1, 2])
        srv.proc.kill()  # SIGKILL: no shutdown save
        srv.proc.wait(10)
    finally:
        srv.kill()
    saved = saved_positions(state_dir, toy)

    again = ServerProcess(toy["model_dir"], *args, workdir=tmp_path)
    try:
        with Client(again.address, timeout=30) as c:
            for sid, seq in seqs.items():
                position = check_continues(toy, c, sid, seq)
                assert position == saved[sid] and 6 <= position <= 10  # lost: 10 - position
            if "late" in saved:
                assert c.session("late").close() == saved["late"]
            else:
                code, _ = code_of(lambda: c.session("late").snapshot())
                assert code == grpc.StatusCode.NOT_FOUND
    finally:
        again.kill()


TEAR = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from ssmstream.runtime import sessions

    state_dir, S, sha = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    key = sessions.SnapshotKey.in_dir(state_dir)
    store = sessions.SessionStore(S, 8, model_sha=sha, snapshot_key=key)
    s = store.create("anonymous", "kept")
    store.commit(s, np.arange(S, dtype=np.float32) / S, 5)
    store.save(state_dir)                                  # the last good save
    store.commit(s, np.full(S, 7.0, dtype=np.float32), 3)

    class Tearing:                                         # half of the first part, then hang
        def __init__(self, f):
            self.f = f
        def fileno(self):
            return self.f.fileno()
        def write(self, b):
            self.f.write(b[: len(b) // 2]); self.f.flush()
            print("torn", flush=True); time.sleep(120)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()

    sessions.open = lambda path, mode: Tearing(open(path, mode))
    store.save(state_dir)                                  # killed in the middle of this
    """
)


def test_a_save_torn_by_sigkill_is_ignored_and_the_last_good_one_loads(toy, tmp_path):
    state_dir = tmp_path / "state"
    writer = subprocess.Popen(
        [sys.executable, "-c", TEAR, str(state_dir), str(toy["S"]), _sha(toy)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "torn"
    finally:
        writer.kill()  # SIGKILL mid-write
        writer.wait(10)
        writer.stdout.close()
    (torn,) = state_dir.glob(f".{STORE_FILE}.*.tmp")
    assert 0 < torn.stat().st_size < (state_dir / STORE_FILE).stat().st_size

    srv = ServerProcess(toy["model_dir"], "--state-dir", str(state_dir), "--device", "cpu",
                        workdir=tmp_path)  # fmt: skip
    try:
        assert "restored 1 sessions" in srv.output()
        with Client(srv.address, timeout=30) as c:
            position, state, _ = decode_snapshot(c.session("kept").snapshot())
        S = toy["S"]
        assert position == 5  # the last good save, not the torn one
        np.testing.assert_array_equal(state, np.arange(S, dtype=np.float32) / S)
    finally:
        srv.kill()


def test_a_corrupt_state_file_stops_the_start_and_is_kept(toy, tmp_path):
    state_dir = tmp_path / "state"
    key = SnapshotKey.in_dir(state_dir)
    store = SessionStore(toy["S"], 4, model_sha=_sha(toy), snapshot_key=key)
    store.create("anonymous", "precious")
    path = store.save(state_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="server exited 2") as e:
        ServerProcess(toy["model_dir"], "--state-dir", str(state_dir), "--device", "cpu",
                      workdir=tmp_path)  # fmt: skip
    assert "--state-dir: " in str(e.value) and "tampered" in str(e.value)
    assert path.read_bytes() == bytes(data), "the refused file must be left for an operator"


def test_overlapping_saves_do_not_tear_the_file(toy, tmp_path):
    """The server's shutdown save can start while a periodic save still runs (a thread):
    concurrent saves must neither fail nor leave a corrupt file."""
    S = 4096
    key = SnapshotKey.generate()
    store = SessionStore(S, 64, model_sha="m", snapshot_key=key)
    for i in range(64):
        s = store.create("p", f"s{i}")
        store.commit(s, np.full(S, i, dtype=np.float32), i)
    errors = []

    def saver():
        for _ in range(15):
            try:
                store.save(tmp_path)
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=saver) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    loaded = SessionStore(S, 64, model_sha="m", snapshot_key=key)
    assert loaded.load(tmp_path) == 64
    for i in range(64):
        s = loaded.get(f"s{i}", "p")
        assert s.position == i and (loaded.read(s) == i).all()
