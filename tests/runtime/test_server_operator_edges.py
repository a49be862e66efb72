"""What an operator meets at the server's edges:

- a `--tls-key` with a passphrase is refused naming it (OpenSSL had asked for the passphrase
  on the terminal, and without one the error read "[Errno 22] Invalid argument");
- a `--port-file` directory the server cannot write is refused before the model loads (it
  was found after the server was serving, naming no flag); that check writes nothing through
  a link another user put in the directory;
- a positive `--rewind-memory-mb` below one byte is a limit, not "0: no limit";
- a save that fails (a full disk) leaves no partial temp file to keep the disk full;
- `ssmstream info` of a manifest or graph it cannot read says so (a traceback).
"""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import subprocess

import grpc
import pytest
import ssmstream.runtime.manifest as manifest_module
from grpc_helpers import serve
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc
from ssmstream.runtime.client import Client
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.errors import InvalidInput
from ssmstream.runtime.info import main as info_main
from ssmstream.runtime.server import check_files
from ssmstream.runtime.sessions import SessionStore

pytestmark = pytest.mark.timeout(120)


def test_a_tls_key_with_a_passphrase_is_refused_naming_it(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available to generate an encrypted key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-keyout", "enc.key", "-out", "cert.pem", "-days", "1", "-subj", "/CN=x",
         "-passout", "pass:secret"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    cfg = ServerConfig(
        model_dir="m", tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "enc.key")
    )
    with pytest.raises(InvalidInput) as e:
        check_files(cfg)
    assert e.value.field == "tls_key"
    assert str(e.value).endswith("enc.key is encrypted (has a passphrase); gRPC needs a plain key")


def test_the_write_check_of_a_shared_directory_writes_through_no_planted_link(tmp_path):
    """The start's check that --port-file's and --state-dir's directories are writable
    writes a probe file there: one at a name known beforehand (the pid) would be written
    through a link that another user of the directory put at that name, truncating the
    file it points to."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"not the server's to write")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / f".write-test.{os.getpid()}").symlink_to(victim)
    check_files(ServerConfig(model_dir="m", port_file=str(shared / "port.json"),
                             state_dir=str(shared / "state")))  # fmt: skip
    assert victim.read_bytes() == b"not the server's to write"
    assert [p.name for p in shared.iterdir()] == [f".write-test.{os.getpid()}"]  # no probe left


def test_a_port_file_directory_that_cannot_be_written_is_refused_naming_it(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    real = pathlib.Path.write_bytes

    def write_bytes(self, data):  # a read-only file system there (root writes past chmod)
        if self.parent == d:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    with pytest.raises(InvalidInput) as e:
        check_files(ServerConfig(model_dir="m", port_file=str(d / "port.json")))
    assert e.value.field == "port_file"
    assert str(e.value) == (
        f"port_file: cannot write {d} (Read-only file system): the port file is written there "
        "once serving"
    )
    assert list(d.iterdir()) == []


def test_a_full_disk_for_the_new_snapshot_key_names_the_state_dir(tmp_path, monkeypatch):
    # the start had ended in "ssmstream serve: [Errno 28] No space left on device" alone
    import ssmstream.runtime.snapshots as snapshots
    from ssmstream.runtime.server import snapshot_key

    def full(path, secret):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(snapshots, "_write_key", full)
    with pytest.raises(InvalidInput) as e:
        snapshot_key(ServerConfig(model_dir="m", state_dir=str(tmp_path / "state")))
    assert e.value.field == "state_dir"
    key = tmp_path / "state" / "snapshot.key"
    assert str(e.value) == f"state_dir: cannot write {key}: No space left on device"


def test_a_rewind_memory_below_one_byte_is_a_limit_not_none(tiny_token_model):
    def checkpoint_bytes(mb: float) -> int:
        with serve(tiny_token_model["model_dir"], rewind_memory_mb=mb) as s:
            with Client(f"127.0.0.1:{s.port}", timeout=30) as c:
                return c.info().limits.checkpoint_bytes_per_session

    # 1e-7 MiB is 0.1 byte, 2e-6 MiB 2 bytes: both below one state, so one checkpoint a
    # session (History.max_bytes); 0 is no limit: the whole window's checkpoints
    assert checkpoint_bytes(1e-7) == checkpoint_bytes(2e-6) < checkpoint_bytes(0)


def test_a_failed_shutdown_save_sets_the_older_save_aside_and_exits_1(
    tiny_token_model, tmp_path, monkeypatch
):
    """The older sessions.bin would have been restored at the next start: older positions,
    sessions closed since back again. Status 1 also when no session was live."""
    state = tmp_path / "state"
    with serve(tiny_token_model["model_dir"], state_dir=str(state)) as srv:
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            c.create_session("s1").close()
        srv.server.store.save(state)  # an older save, holding nothing live now

        def full(directory):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(srv.server.store, "save", full)
    assert srv.server.unsaved == 1
    assert sorted(p.name for p in state.iterdir()) == ["lock", "sessions.bin.stale", "snapshot.key"]


def test_a_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    store = SessionStore(4, capacity=2)
    store.create("p", "a")
    store.save(tmp_path)
    saved = (tmp_path / "sessions.bin").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    store.create("p", "b")
    with pytest.raises(OSError, match="No space left"):
        store.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["sessions.bin"]
    assert (tmp_path / "sessions.bin").read_bytes() == saved  # the last good save is kept


@pytest.fixture(scope="module")
def metered(tiny_token_model):
    with serve(tiny_token_model["model_dir"], metrics_port=0) as s:
        yield s


def test_info_of_files_it_cannot_read_says_so(tiny_token_model, monkeypatch, capsys):
    model = pathlib.Path(tiny_token_model["model_dir"])
    real_read, real_open = pathlib.Path.read_text, open

    def read_text(self, *a, **kw):
        if self.name == "manifest.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    assert info_main([str(model)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"ssmstream info: error: {model / 'manifest.json'} cannot be read: Permission denied\n"
    )
    monkeypatch.setattr(pathlib.Path, "read_text", real_read)

    def denied_open(path, *a, **kw):  # the graph files (sha256_file) cannot be read
        if str(path).endswith(".onnx"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(manifest_module, "open", denied_open, raising=False)
    assert info_main([str(model)]) == 0
    assert "unreadable (Permission denied)" in capsys.readouterr().out
    with pytest.raises(Exception, match=r"step\.onnx \(step graph\) cannot be read: Permission"):
        manifest_module.load_manifest(model)


@pytest.mark.parametrize(
    "method, kind",
    [("/grpc.health.v1.Health/Check", "unary_unary"),
     ("/grpc.health.v1.Health/Watch", "unary_stream"),
     ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream")],
)  # fmt: skip
def test_garbage_to_health_and_reflection_is_invalid_argument_not_a_logged_error(
    metered, method, kind, caplog
):
    """The health Check needs no token: each garbage request had logged a traceback at ERROR
    (and answered UNKNOWN), a log flood open to anyone."""
    with grpc.insecure_channel(f"127.0.0.1:{metered.port}") as ch:
        call = getattr(ch, kind)(method)  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as e:
            if kind == "unary_unary":
                call(b"\xff\xff\xff", timeout=10)
            elif kind == "unary_stream":
                list(call(b"\xff\xff\xff", timeout=10))
            else:
                list(call(iter([b"\xff\xff\xff"]), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == (
            "request: not a valid protobuf message of this RPC (DecodeError)"
        )
        # a valid request still gets its answer
        ok = ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
        assert ok == b"\x08\x01"  # SERVING
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_a_message_limit_below_a_snapshot_is_warned_of_at_start(tiny_token_model, caplog):
    """The server refused its own snapshots (RESOURCE_EXHAUSTED), with nothing said."""
    words = "is less than a request carrying a snapshot of this model"
    with serve(tiny_token_model["model_dir"]) as srv:
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            snap = c.create_session().snapshot()
    assert words not in caplog.text
    with serve(tiny_token_model["model_dir"], max_message_bytes=len(snap)) as srv:
        assert words in caplog.text
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.restore(snap)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # what the server sends is never held below a snapshot or a row of outputs
            s = c.create_session()
            assert s.step(tokens=[1, 2, 3]).position == 3
            assert len(s.snapshot()) == len(snap) and c.info().state_size > 0


def test_a_row_of_outputs_is_sent_whatever_the_message_limit(make_toy, tmp_path):
    """With the send limit held to --max-message-bytes, an OUTPUT_LAST of a wide model had
    failed after its step applied (RESOURCE_EXHAUSTED "Sent message larger than max")."""
    wide = make_toy(tmp_path / "wide", "tokens", d_out=20000)  # 80 KB of outputs a row
    with serve(wide["model_dir"], max_message_bytes=64 * 1024) as srv:
        with Client(f"127.0.0.1:{srv.port}", timeout=30) as c:
            s = c.create_session()
            r = s.step(tokens=[1, 2, 3])
            assert r.position == 3 and r.outputs.shape == (1, 20000)
            with pytest.raises(grpc.RpcError) as e:
                s.step(tokens=[1, 2], output="all")  # 160 KB: refused, not applied
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert s.snapshot() and s.position == 3


def test_an_output_all_larger_than_the_message_limit_is_refused_before_it_steps(
    tiny_token_model,
):
    """The response limit was 64 MiB whatever --max-message-bytes said: a response past a
    default gRPC client's 4 MiB failed in that client after the step had applied (its retry
    applied it again). Responses are held to --max-message-bytes, which is checked before
    the step."""
    limit = 64 * 1024
    with serve(tiny_token_model["model_dir"], max_message_bytes=limit) as srv:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:  # grpc's default limits
            stub = pb_grpc.StreamingInferenceStub(ch)
            V = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).vocab_size
            sid = stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
            fits = (limit - 256) // (4 * V)
            r = stub.Step(
                pb.StepRequest(session_id=sid, tokens=[1] * fits, output=pb.OUTPUT_ALL), timeout=30
            )
            assert r.position == fits
            with pytest.raises(grpc.RpcError) as e:
                stub.Step(
                    pb.StepRequest(session_id=sid, tokens=[1] * (fits + 1), output=pb.OUTPUT_ALL),
                    timeout=30,
                )
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "(65536 bytes: --max-message-bytes)" in e.value.details()
            snap = stub.SnapshotSession(pb.SnapshotRequest(session_id=sid), timeout=10)
            assert snap.position == fits  # nothing applied


def test_setting_the_older_save_aside_never_raises(tmp_path, monkeypatch):
    """It runs where a save just failed (a failing disk, a stale NFS mount): is_file() may
    raise too, and the shutdown must still log and finish."""
    from ssmstream.runtime.server import _set_aside

    saved = tmp_path / "sessions.bin"
    saved.write_bytes(b"older")
    assert "kept as" in _set_aside(saved) and (tmp_path / "sessions.bin.stale").exists()
    assert _set_aside(saved) == "there is no older save"

    def failing(self, *a, **kw):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(pathlib.Path, "is_file", failing)
    assert "is left as it is (Input/output error)" in _set_aside(saved)


def test_a_state_dirs_snapshot_key_that_cannot_be_read_names_the_state_dir(tmp_path):
    # it had named --snapshot-key, a flag not given
    from ssmstream.runtime.server import snapshot_key

    (tmp_path / "state" / "snapshot.key").mkdir(parents=True)  # a directory, not a key
    with pytest.raises(InvalidInput) as e:
        snapshot_key(ServerConfig(model_dir="m", state_dir=str(tmp_path / "state")))
    assert e.value.field == "state_dir" and "snapshot.key: Is a directory" in str(e.value)


def test_the_start_lines_give_an_ipv6_address_as_a_url_has_it(tiny_token_model, caplog):
    """`--host ::1`: the start lines said `on ::1:PORT` and `http://::1:PORT/metrics`, which
    no client or browser takes; the address is bracketed, and the metrics URL logged works."""
    import socket
    import urllib.request

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with caplog.at_level("INFO", logger="ssmstream.runtime"):
        with serve(tiny_token_model["model_dir"], host="::1", metrics_port=0) as srv:
            said = [r.getMessage() for r in caplog.records]
            (serving,) = [m for m in said if m.startswith("serving model ")]
            assert f" on [::1]:{srv.port} via " in serving
            url = f"http://[::1]:{srv.server.metrics_port}/metrics"
            assert f"metrics on {url}" in said
            assert b"ssmstream_sessions_active" in urllib.request.urlopen(url, timeout=10).read()
            with Client(f"[::1]:{srv.port}", timeout=10) as c:
                assert c.info().state_size > 0
