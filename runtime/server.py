"""`ssmstream serve MODEL_DIR`: the gRPC server (grpc.aio) around Engine, SessionStore, Batcher.

    clients ──gRPC──► AuthInterceptor ─► StreamingInferenceServicer ─► SessionService
                                                                     ├─► SessionStore (sessions)
                                                                     └─► Batcher ─► Engine (ORT)

Also served: grpc.health.v1 (SERVING / NOT_SERVING), server reflection, and Prometheus
metrics over HTTP on --metrics-port.

Lifecycle:
  start — open the engine, restore the sessions saved in --state-dir (a corrupt or
          foreign file stops the start: nothing is dropped silently), start the batcher,
          bind (TLS / mTLS when configured), health SERVING, one log line with the model,
          provider, address and limits.
  shared — with --state-store redis://…, sessions are also kept in Redis (runtime/
          replication.py) and health service "ssmstream.StateStore" says whether Redis is
          reachable.
  stop  — on SIGTERM/SIGINT/SIGHUP: health NOT_SERVING, new work refused with UNAVAILABLE, idle
          Streams ended, in-flight requests get --grace seconds to finish, the batcher
          stops, then every session is saved to --state-dir (so each step a client saw
          acknowledged is in the saved state) or written to the shared store with its
          lease released (another replica continues it at once), and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import socket
import ssl
import sys
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from ssmstream.protos import inference_pb2_grpc as pb_grpc

from .admission import RpcLimit
from .auth import AuthInterceptor, TokenTable
from .config import ServerConfig, parse_config, with_flags
from .errors import FailureRun, InvalidInput, RuntimeErrorBase
from .health import Health
from .keepalive import MIN_CLIENT_PING_INTERVAL, keepalive_options, milliseconds
from .metrics import FeaturesCollector, ServerMetrics
from .prefix_cache import entry_bytes
from .secret_files import warn_unless_private
from .service import DRAINING, ServiceLimits, SessionService
from .servicer import StreamingInferenceServicer, max_send_bytes, snapshot_message_bytes
from .sessions import STORE_FILE
from .snapshots import KEY_FILE, OtherKey, SnapshotKey
from .status import SERVICE_NAME, DecodeGuard

log = logging.getLogger(__name__)

STATE_STORE_HEALTH = "ssmstream.StateStore"  # health service name of the shared state store
# each starts a graceful stop; SIGHUP (a closed terminal) only where it is not ignored (nohup)
# and where there is one (not on Windows)
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)
)


def _read(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (+ --tls-client-ca for mTLS), or None."""
    if config.tls_cert is None:
        return None
    ca = _read(config.tls_client_ca)
    key = _read(config.tls_key)
    warn_unless_private(
        config.tls_key, "TLS private key", "whoever reads it can pose as this server"
    )
    return grpc.ssl_server_credentials(
        [(key, _read(config.tls_cert))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def cleartext_tokens(config: ServerConfig) -> bool:
    """Whether bearer tokens would cross a network unencrypted: --auth-tokens without TLS on
    an address other machines reach (a loopback address: only this machine, or a proxy on it
    that terminates TLS)."""
    if config.auth_tokens is None or config.tls_cert is not None:
        return False
    host = config.host.strip("[]").lower()
    try:
        return host != "localhost" and not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: where it points is not known here
        return True


def check_bindable(host: str, port: int, field: str = "port") -> None:
    """InvalidInput naming the flag and the address when nothing can listen on it: `host`
    when it does not resolve or is not this machine's, else `field` (port 0: any port will
    do, only the host is checked)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise InvalidInput("host", f"cannot listen on {host!r}: {e.strerror or e}") from None
    except UnicodeError as e:  # not a name the idna codec encodes: a label over 63 characters
        raise InvalidInput("host", f"cannot listen on {host!r}: not a host name ({e})") from None
    family, kind, proto, _, addr = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does
            s.bind(addr)
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:  # an address of another machine
            field = "host"
        raise InvalidInput(field, f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def check_files(config: ServerConfig) -> None:
    """What start would find wrong only after the engine loaded, or at shutdown: TLS
    material that does not load, a --state-dir the server cannot write (its sessions would
    be lost at SIGTERM), a --port-file in a directory that does not exist. InvalidInput
    names the flag."""
    c = config
    if c.tls_cert is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:  # a key with a passphrase: refused, not asked for on the terminal
            ctx.load_cert_chain(c.tls_cert, c.tls_key, password=_no_passphrase)
        except _Encrypted:
            raise InvalidInput(
                "tls_key", f"{c.tls_key} is encrypted (has a passphrase); gRPC needs a plain key"
            ) from None
        except (OSError, ssl.SSLError) as e:
            raise InvalidInput(*_tls_problem(c, e)) from None
        if c.tls_client_ca is not None:
            try:
                ctx.load_verify_locations(c.tls_client_ca)
            except (OSError, ssl.SSLError) as e:
                raise InvalidInput("tls_client_ca", f"cannot load {c.tls_client_ca}: {e}") from None
    if c.state_dir:
        d = Path(c.state_dir)
        saved = d / STORE_FILE
        if saved.exists() and not saved.is_file():
            raise InvalidInput("state_dir", f"{saved} is not a file")
        _check_writable(d, "state_dir", "sessions are saved there", create=True)
    if c.port_file:
        d = Path(c.port_file).absolute().parent
        in_state_dir = c.state_dir and d.resolve() == Path(c.state_dir).resolve()  # made at start
        if not d.is_dir() and not in_state_dir:
            raise InvalidInput("port_file", f"{Path(c.port_file).parent} is not a directory")
        if Path(c.port_file).is_dir():
            raise InvalidInput("port_file", f"{c.port_file} is a directory, not a file")
        _check_writable(
            d, "port_file", "the port file is written there once serving", create=in_state_dir
        )


def _set_aside(saved: Path) -> str:
    """An older save that a failed shutdown save did not replace, renamed so that the next
    start does not restore older positions (and sessions closed since) as if they were the
    last; what became of it, for the log."""
    stale = saved.with_name(saved.name + ".stale")
    try:
        if not saved.is_file():
            return "there is no older save"
        os.replace(saved, stale)
    except OSError as e:
        return f"the older save {saved} is left as it is ({e.strerror or e}): remove it"
    return f"the older save is kept as {stale}, which the next start does not load"


def _tls_problem(c: ServerConfig, e: Exception) -> tuple[str, str]:
    """(field, what) for a --tls-cert/--tls-key pair that does not load: the file that is no
    PEM, or PEM without what its flag takes (OpenSSL says only "[SSL] PEM lib"), else
    OpenSSL's own words."""
    pem = {}
    for field, path in (("tls_cert", c.tls_cert), ("tls_key", c.tls_key)):
        try:
            pem[field] = Path(path).read_bytes()
        except OSError as read:
            return field, f"cannot read {path}: {read.strerror or read}"
        if b"-----BEGIN " not in pem[field]:
            return field, f"{path} is not PEM (no '-----BEGIN ' line)"
    # PEM, but not what the flag takes (the two files swapped, a CA's certificate as the key)
    if b"-----BEGIN CERTIFICATE-----" not in pem["tls_cert"]:
        return "tls_cert", f"{c.tls_cert} holds no certificate (no 'BEGIN CERTIFICATE' block)"
    if b"PRIVATE KEY-----" not in pem["tls_key"]:
        return "tls_key", f"{c.tls_key} holds no private key (no 'BEGIN … PRIVATE KEY' block)"
    return "tls_cert/tls_key", f"cannot load {c.tls_cert} / {c.tls_key}: {e}"


class _Encrypted(Exception):
    pass


def _no_passphrase():
    raise _Encrypted


def _check_writable(d: Path, field: str, why: str, create: bool = False) -> None:
    """InvalidInput naming `field` unless a file can be written in directory d (what is
    written there later goes to a temp file, then is renamed). create: d may be missing if
    it could be made (nothing is made here: a start that fails leaves no directory)."""
    base = d.absolute()
    while create and not base.exists() and base != base.parent:
        if base.is_symlink():  # mkdir would fail on it with EEXIST
            raise InvalidInput(
                field, f"cannot write {d} ({base} is a link to {os.readlink(base)}, which does "
                f"not resolve to a directory): {why}",
            )  # fmt: skip
        base = base.parent
    if base != d.absolute() and not base.is_dir():
        raise InvalidInput(field, f"cannot write {d} ({base} is not a directory): {why}")
    # a name no one can guess: a link put at a name known beforehand (in a directory others
    # may write, such as /tmp) would have the file it points to truncated here
    probe = base / f".write-test.{os.getpid()}.{secrets.token_hex(8)}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InvalidInput(field, f"cannot write {d} ({e.strerror or e}): {why}") from None


LOCK_FILE = "lock"  # in --state-dir: locked while a server uses the directory


def lock_state_dir(d: Path) -> int | None:
    """A descriptor that holds an exclusive lock on d/LOCK_FILE while it stays open (the
    process's end lets it go too), or InvalidInput naming --state-dir when another server
    holds it: two servers saving to one directory overwrite each other's sessions. None where
    there is no flock (Windows: not checked)."""
    try:
        import fcntl
    except ImportError:
        return None
    path = d / LOCK_FILE
    try:  # O_NOFOLLOW: a link planted there is not followed
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as e:
        raise InvalidInput("state_dir", f"cannot open {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InvalidInput(
            "state_dir", f"{d} is in use by another server (pid {holder}): give each its own"
        ) from None
    except OSError as e:  # a filesystem without locks (ENOLCK, EOPNOTSUPP): serve unchecked
        os.close(fd)
        log.warning("--state-dir: cannot lock %s (%s): a second server on it goes unnoticed",
                    path, e.strerror or e)  # fmt: skip
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def snapshot_key(config: ServerConfig) -> SnapshotKey | None:
    """--snapshot-key FILE, else DIR/snapshot.key of --state-dir; None: the store decides
    (one key per Redis for a shared store, else a random key for this process)."""
    if config.snapshot_key:
        return SnapshotKey.from_file(config.snapshot_key)
    if config.state_dir:
        key = Path(config.state_dir) / KEY_FILE
        try:
            return SnapshotKey.in_dir(config.state_dir)
        except OSError as e:  # a full disk
            raise InvalidInput("state_dir", f"cannot write {key}: {e.strerror or e}") from e
        except InvalidInput as e:  # the key file's own reading: said of --state-dir, not
            raise InvalidInput("state_dir", str(e).partition(": ")[2]) from e  # --snapshot-key
    return None


class _ResponseToAGoneClient(logging.Filter):
    """grpc logs an ERROR with a traceback ("ExecuteBatchError raised in core by servicer
    method") when a Stream's or Generate's response cannot be sent because its client went
    away while the send waited (a client that stopped reading, then cancelled): any client
    can cause one at will, each call. The call ends as a cancel does (the session detached,
    nothing lost), so the record is said at DEBUG without its traceback, or not at all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("ExecuteBatchError raised in core by servicer"):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


RESPONSE_TO_A_GONE_CLIENT = _ResponseToAGoneClient()


class Server:
    """One serving process's parts; `await start()`, then `await stop()` (or `run()`).

    engine: an already opened Engine to serve (else opened from config.model_dir).
    """

    def __init__(self, config: ServerConfig, engine=None):
        self.config = config
        self.engine = engine
        self.metrics = ServerMetrics()
        logging.getLogger("grpc._cython.cygrpc").addFilter(RESPONSE_TO_A_GONE_CLIENT)  # (once)
        self.store = self.batcher = self.service = self.servicer = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: Health | None = None
        self._tasks: list[asyncio.Task] = []
        self._hurried: asyncio.Future | None = None  # a second signal's stop(0)
        self._stopped = asyncio.Event()
        self._stopping = False
        self._serving = False  # a start that failed undoes itself without drain/stop logs
        self._port_file: str | None = None  # the text this server wrote to --port-file
        self._state_lock: int | None = None  # lock_state_dir's descriptor
        self.unsaved = 0  # sessions whose last steps the shutdown could not write

    async def start(self) -> int:
        """Open everything and start serving; returns the bound port. A start that fails
        undoes what it opened (without saving: a --state-dir it could not load stays as it
        was) and raises."""
        try:
            return await self._start()
        except BaseException:
            await self.stop(0, save=False)
            raise

    async def _start(self) -> int:
        from .batcher import Batcher
        from .engine import Engine
        from .sessions import SessionStore

        c = self.config
        check_bindable(c.host, c.port)  # before the slow parts, and without grpc's own log
        if c.metrics_port:
            check_bindable(c.host, c.metrics_port, "metrics_port")
        check_files(c)
        # --snapshot-key is read before the model loads (an unreadable file fails fast);
        # --state-dir's key once the model has opened and the directory is made (below)
        key = snapshot_key(c) if c.snapshot_key else None
        tokens = TokenTable.from_file(c.auth_tokens) if c.auth_tokens else None
        if cleartext_tokens(c):
            log.warning(
                "--auth-tokens without --tls-cert: bearer tokens reach %s in clear text; serve "
                "TLS (--tls-cert/--tls-key) or bind a loopback --host behind a TLS proxy",
                c.host,
            )
        credentials = server_credentials(c)
        if self.engine is None:
            self.engine = Engine(
                c.model_dir,
                device=c.device,
                threads=c.threads,
                step_threads=c.step_threads,
                cuda_options={"use_tf32": c.tf32, "enable_cuda_graph": c.cuda_graphs},
            )
        info = self.engine.info
        if c.state_dir:  # made once the model has opened: a start that fails leaves none
            try:
                Path(c.state_dir).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InvalidInput("state_dir", f"cannot make it: {e.strerror or e}") from e
            self._state_lock = lock_state_dir(Path(c.state_dir))  # before its files are read
        key = key or snapshot_key(c)
        if key is None and c.state_store == "memory":
            log.warning(
                "snapshots are signed with a random key: they are valid until this server stops "
                "(give --snapshot-key or --state-dir to keep them valid across restarts)"
            )
        store_args = dict(
            state_size=int(info["state_size"]),
            capacity=c.max_sessions,
            ttl=c.session_ttl,
            max_per_principal=c.max_sessions_per_principal or None,
            model_sha=info["step_sha256"],
            snapshot_key=key,
        )
        replication = None
        if c.state_store == "memory":
            defaults = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
            ignored = [
                f"--{name.replace('_', '-')}"
                for name in ("persist_every", "lease_ttl", "replica_id")
                if getattr(c, name) != defaults[name]
            ]
            if ignored:
                log.warning(
                    "%s: only for a shared --state-store; ignored with the in-memory store",
                    ", ".join(ignored),
                )
        else:
            from .replication import RedisReplication, StoreCollector

            replication = RedisReplication(
                url=c.state_store,
                persist_every=c.persist_every,
                lease_ttl=c.lease_ttl,
                replica_id=c.replica_id,
            )
            self.metrics.registry.register(StoreCollector(replication))
        try:
            slab = self.engine.new_slab(c.max_sessions)  # every session's state, on its device
        except (MemoryError, InvalidInput) as e:  # the slab's zeros() names its "capacity"
            if isinstance(e, InvalidInput) and e.field != "capacity":
                raise
            need = c.max_sessions * 4 * int(info["state_size"])
            raise InvalidInput(
                "max_sessions", f"{c.max_sessions} sessions need {need:,} bytes of state: too many"
            ) from None
        self.store = SessionStore(**store_args, replication=replication, slab=slab)
        e = self.engine
        log.info(
            "state slab: %d sessions x %s B on %s (%.1f MiB); per token host<->device: "
            "%d B in (input, slot), %d B out (outputs); the state stays on the %s%s",
            c.max_sessions, f"{slab.row_bytes:,}", e.provider, slab.nbytes / 2**20,
            *e.slot_row_bytes,
            e.device, ", CUDA graphs per batch bucket" if e.cuda_graphs else "",
        )  # fmt: skip
        if replication is not None:
            replication.start()
        restored = self._load_sessions(key) if c.state_dir else 0
        self.batcher = Batcher(self.engine, self.store, c.max_batch, c.max_batch_delay)
        self.batcher.add_listener(self.metrics.observe_batch)
        await self.batcher.start()
        self.metrics.watch_store(self.store.stats)
        self.metrics.watch_batcher(self.batcher.stats)
        limits = ServiceLimits(
            c.max_tokens_per_request,
            c.max_new_tokens,
            c.session_ttl,
            rewind_window=c.rewind_window,
            rewind_memory_bytes=math.ceil(c.rewind_memory_mb * 2**20),  # > 0: a limit
            prefix_cache_bytes=c.prefix_cache_bytes,
            prefix_cache_scope=c.prefix_cache_scope,
        )
        self.service = SessionService(self.engine, self.store, self.batcher, limits)
        smallest = entry_bytes(1, self.engine.state_size, self.engine.d_output)
        if 0 < limits.prefix_cache_bytes < smallest:
            log.warning(
                "--prefix-cache-mb %g holds no prompt state (one takes at least %d bytes): "
                "nothing will be cached; use 0 to turn the cache off",
                c.prefix_cache_mb,
                smallest,
            )
        restore = snapshot_message_bytes(self.engine.state_size)
        if c.max_message_bytes < restore:
            log.warning(
                "--max-message-bytes %d is less than a request carrying a snapshot of this "
                "model (up to %d bytes): RestoreSession and CreateSession with a snapshot will "
                "be refused; raise it",
                c.max_message_bytes,
                restore,
            )
        if c.state_dir:
            self.service.draining_says = DRAINING["state_dir"]
        self.servicer = StreamingInferenceServicer(self.service, c, self.metrics)
        self.metrics.registry.register(FeaturesCollector(self.service.feature_stats))

        options = [
            ("grpc.max_receive_message_length", c.max_message_bytes),
            ("grpc.max_send_message_length", max_send_bytes(c, e.d_output, e.state_size)),
            ("grpc.so_reuseport", 0),
            *connection_options(c),
        ]
        interceptors = [
            AuthInterceptor(
                tokens, on_denied=lambda _m: self.metrics.count_error("UNAUTHENTICATED")
            ),
            DecodeGuard(),
        ]
        if c.max_concurrent_rpcs:
            refused = lambda: self.metrics.count_error("RESOURCE_EXHAUSTED")  # noqa: E731
            interceptors.append(RpcLimit(c.max_concurrent_rpcs, on_refused=refused))
        self._grpc = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_StreamingInferenceServicer_to_server(self.servicer, self._grpc)
        self._health = Health()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        try:
            if credentials is None:
                self.port = self._grpc.add_insecure_port(c.address)
            else:
                self.port = self._grpc.add_secure_port(c.address, credentials)
        except RuntimeError:  # grpc's "Failed to bind to address …"
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {c.address}: address in use or not available here")
        await self._grpc.start()
        self._serving = True
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.store.replication is not None:
            self._tasks.append(asyncio.create_task(self._watch_store()))
        if c.metrics_port is not None:
            self.metrics_port = self.metrics.serve(c.metrics_port, c.host)
        self._tasks.append(asyncio.create_task(self._evict_loop()))
        if c.state_dir and c.save_interval > 0:
            self._tasks.append(asyncio.create_task(self._save_loop()))
        if c.port_file:
            self._port_file = _write_port_file(c.port_file, self.port, self.metrics_port)
        r = self.store.replication  # sessions live in the shared store: none restored here
        sessions = f"restored {restored} sessions"
        if r is not None:
            sessions = f"sessions in {r.backend.url} (persist every {r.persist_every}, lease "
            sessions += f"{r.lease_ttl:g}s)"
        log.info(
            "serving model %r (%s, S=%d, %s) on %s:%d via %s%s%s; %s; "
            "limits: max_sessions=%d per_principal=%s ttl=%gs max_batch=%d delay=%gms "
            "tokens/request=%d message=%dB",
            info.get("name"),
            info["input_kind"],
            int(info["state_size"]),
            info.get("dtype"),
            c.address.rpartition(":")[0],  # an IPv6 address bracketed, as in a URL
            self.port,
            info.get("provider"),
            " with TLS" + (" (mTLS)" if c.tls_client_ca else "") if credentials else "",
            ", bearer auth" if tokens else "",
            sessions,
            c.max_sessions,
            c.max_sessions_per_principal or "none",
            c.session_ttl,
            c.max_batch,
            1e3 * c.max_batch_delay,
            c.max_tokens_per_request,
            c.max_message_bytes,
        )
        return self.port

    def _load_sessions(self, key: SnapshotKey | None) -> int:
        """The sessions saved in --state-dir. Saved beside a snapshot.key that is gone now
        (this start made a new one), they were signed with the lost key: said so, and the new
        key removed again, so that the next start says it too (not "another server key")."""
        try:
            return self.store.load(self.config.state_dir)
        except OtherKey:
            if key is None or not key.created:
                raise
            with contextlib.suppress(OSError):
                key.path.unlink()
            saved = Path(self.config.state_dir) / STORE_FILE
            raise InvalidInput(
                "state_dir",
                f"{saved} was signed with the key in {key.path}, which is missing: put that "
                f"file back (or give the key with --snapshot-key), or move {saved} aside to "
                "start without its sessions",
            ) from None

    async def _evict_loop(self) -> None:
        """Evict the sessions idle past their TTL every TTL/4 (0.05 to 5 s). A sweep that
        fails is logged, with its traceback the first time in a row, and the next one tried:
        a sweep that ended would leave idle sessions holding their slots until the server is
        full."""
        period = min(max(self.config.session_ttl / 4, 0.05), 5.0)
        run = FailureRun(log, "idle-session sweep", period, "sweeps")
        while True:
            await asyncio.sleep(period)
            try:
                self.store.evict_idle()
            except Exception:
                run.failure()
                continue
            run.success()

    async def _watch_store(self) -> None:
        """Health of STATE_STORE_HEALTH follows the shared store: NOT_SERVING while degraded
        (Redis unreachable; in-memory sessions are still served, so "" stays SERVING)."""
        up = None
        while True:
            if up is not (not self.store.replication.degraded):
                up = not self.store.replication.degraded
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if up
                    else (health_pb2.HealthCheckResponse.NOT_SERVING)
                )
                await self._health.set(STATE_STORE_HEALTH, status)
            await asyncio.sleep(0.25)

    async def _save_loop(self) -> None:
        """Start a save of the sessions every --save-interval seconds (on a fixed schedule, not
        the interval after the last one ended: a save of many sessions takes a while); a save
        still running when the next is due delays it, and one of a store unchanged since the
        last save is skipped (it would write the same file). A failed save is logged and the
        next one tried (a full disk must not end periodic saves, nor the one at shutdown)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due = max(due + self.config.save_interval, loop.time())
            await asyncio.sleep(due - loop.time())
            if not self.store.changed_since_save:
                continue
            try:
                await asyncio.to_thread(self.store.save, self.config.state_dir)
            except Exception:
                log.exception("periodic save to %s failed; trying again", self.config.state_dir)

    async def stop(self, grace: float | None = None, save: bool = True) -> None:
        """Drain and shut down (see the module docstring); safe to call twice. save: write
        the sessions (--state-dir, --state-store); off when a start failed."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            await self._shut_down(grace, save)
        finally:  # also when the shutdown save failed: no port file names a port that is gone
            if self._port_file is not None:
                _remove_port_file(self.config.port_file, self._port_file)
            if self._state_lock is not None:  # after the last save: the next server may load
                os.close(self._state_lock)
                self._state_lock = None
            self._stopped.set()
        if self._serving:
            log.info("stopped")

    async def _shut_down(self, grace: float | None, save: bool) -> None:
        grace = self.config.grace if grace is None else grace
        if self._serving:
            log.info("draining: refusing new work, %gs grace for in-flight requests", grace)
        self.metrics.draining.set(1)
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.service is not None:
            self.service.drain()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self.service is not None:
            await self.service.settled()  # cancelled handlers' cleanup, before the save
            self.service.shutdown()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:  # a background task's failure must not skip the shutdown save
            try:
                await t
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("background task %r failed", t.get_coro().__qualname__)
        if self.batcher is not None:
            await self.batcher.close()
        if save and self.config.state_dir and self.store is not None:
            try:
                self.store.save(self.config.state_dir)
            except Exception as e:  # a full disk: the sessions are lost; exit status 1
                # any other error too (with its traceback): the older save is set aside and
                # the rest of the shutdown (the metrics exporter's close) still runs
                self.unsaved = max(1, len(self.store))
                log.error(
                    "--state-dir: cannot save %d sessions to %s (%s): they are lost; %s",
                    len(self.store), self.config.state_dir,
                    getattr(e, "strerror", None) or str(e) or type(e).__name__,
                    _set_aside(Path(self.config.state_dir) / STORE_FILE),
                    exc_info=not isinstance(e, OSError),
                )  # fmt: skip
        if self.store is not None and self.store.replication is not None:
            if save:  # written, leases released
                self.unsaved = await asyncio.to_thread(self.store.flush, True)
            if self.service is not None:  # fetches still running end (the flush refuses leases)
                await self.service.fetches_ended()
            self.store.replication.stop()
        self.metrics.close()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT/SIGHUP (a closed terminal), then stop
        gracefully; a second signal ends the grace period at once (calls still running are
        cancelled; sessions are saved)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        received: list[str] = []
        signals = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
        with contextlib.ExitStack() as undo:
            for sig in signals:
                _on_signal(loop, sig, lambda s=sig: (received.append(s.name), stop.set()), undo)
            await self.start()
            await stop.wait()
            log.info("%s received", received[0])
            for sig in signals:
                _on_signal(loop, sig, self._hurry, undo)
            await self.stop()

    def _hurry(self) -> None:
        log.info("second signal: ending the grace period now")
        if self._grpc is not None:  # held: the loop keeps only a weak reference to a task
            self._hurried = asyncio.ensure_future(self._grpc.stop(0))


def _on_signal(loop: asyncio.AbstractEventLoop, sig, callback, undo: contextlib.ExitStack):
    """callback() on `loop` at `sig`. Where the loop takes no signal handlers (Windows' event
    loops), a handler of the signal module hands it to the loop; `undo` puts back the handler
    it replaced."""
    try:
        loop.add_signal_handler(sig, callback)
    except NotImplementedError:
        old = signal.signal(sig, lambda signum, frame: loop.call_soon_threadsafe(callback))
        undo.callback(signal.signal, sig, old)


def _write_port_file(path: str, port: int, metrics_port: int | None) -> str:
    """Write the port file atomically; returns its text (`instance` tells this server's file
    from another's: servers in one process, or containers that all run as pid 1)."""
    info = {"port": port, "metrics_port": metrics_port, "pid": os.getpid()}
    text = json.dumps({**info, "instance": secrets.token_hex(8)})
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:  # a full disk: the check at start wrote an empty file only
        with contextlib.suppress(OSError):  # its name too long: no file, nor an unlink
            Path(tmp).unlink(missing_ok=True)
        raise InvalidInput("port_file", f"cannot write {path}: {e.strerror or e}") from e
    return text


def _remove_port_file(path: str, written: str) -> None:
    """Remove the port file at stop if it is still the one this server wrote (a reader
    must not find the port of a server that is gone, nor lose another server's file)."""
    try:
        if Path(path).read_text() == written:
            os.remove(path)
    except OSError:
        pass


class BackgroundServer:
    """A Server on its own event loop in a thread (tests, benchmarks, embedding):

    with BackgroundServer(config) as srv:
        client = Client(f"127.0.0.1:{srv.port}")
    """

    def __init__(self, config: ServerConfig, engine=None):
        self.server = Server(config, engine)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def port(self) -> int | None:
        """The gRPC port the server listens on; None until start()."""
        return self.server.port

    def start(self) -> BackgroundServer:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(60)
        except BaseException:
            self.stop()
            raise
        return self

    def call(self, coro, timeout: float = 60):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float | None = 0.5) -> None:
        if self._thread.is_alive():
            try:
                self.call(self.server.stop(grace), timeout=60 + (grace or 0))
                # no job of the loop's executor (a periodic save, to_thread) outlives the loop
                self.call(self.loop.shutdown_default_executor(), timeout=60)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def connection_options(c: ServerConfig) -> list[tuple[str, int]]:
    """grpc's options for --keepalive, --keepalive-timeout and --max-connection-idle, and
    the clients' pings the server takes (runtime/keepalive.py). A client that stops answering
    is dropped and its calls end: its Stream had held its session's attachment and an RPC slot
    until the TCP connection died, hours later where nothing closes it."""
    options = [
        *keepalive_options(c.keepalive, c.keepalive_timeout),
        ("grpc.http2.min_ping_interval_without_data_ms", milliseconds(MIN_CLIENT_PING_INTERVAL)),
    ]
    if c.max_connection_idle:
        options.append(("grpc.max_connection_idle_ms", milliseconds(c.max_connection_idle)))
    return options


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raise this process's soft limit of open files to its hard limit (POSIX; elsewhere a
    no-op); returns (before, after) when it changed. Every client connection holds a file
    descriptor from its TCP accept on, before any token is checked: at a soft limit of 1024
    (the default of a login shell or a systemd service), a thousand idle connections that
    anyone can open left no descriptor to accept the next client (nor for a periodic save)."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):  # refused (a limit the kernel caps lower): serve as it is
        return None
    return soft, want


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if (raised := raise_open_files_limit()) is not None:
        log.info("open files limit raised from %d to %d (one per client connection)", *raised)
    server = Server(config)
    try:
        asyncio.run(server.run())
    except (RuntimeErrorBase, OSError, ValueError) as e:
        log.error("ssmstream serve: %s", with_flags(str(e)))
        return 2
    return 1 if server.unsaved else 0  # 1: stopped, but the last steps of some sessions lost


if __name__ == "__main__":
    sys.exit(main())
