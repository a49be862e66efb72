"""ServerConfig: every setting of `ssmstream serve`, one dataclass, one flag per field.

Each field carries its flag in its metadata (help, `--help` group, metavar, choices) and
`build_parser()` builds the parser from `dataclasses.fields`, so a setting is declared once;
`ServerConfig.__post_init__` validates them and names the offending field, so a config
built in Python (tests, benchmarks, embedding) is checked the same way as one from argv.

Units: seconds for times, bytes for sizes; 0 means "off / no limit" where noted.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import socket
import typing
from dataclasses import dataclass, field

from .cli import HelpFormatter, said_of_flags
from .keepalive import MAX_SECONDS as MAX_GRPC_SECONDS
from .providers import MAX_THREADS

GROUPS: dict[str, str | None] = {  # flag groups of `--help`, in order: title -> description
    "network": None,
    "engine": None,
    "sessions": None,
    "scale-out": (
        "Several replicas behind a sticky gRPC proxy (deploy/) share sessions through Redis: "
        "any replica can continue any session."
    ),
    "batching": None,
    "limits": None,
    "security": None,
    "operations": None,
}
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# seconds: the idle sweep runs every TTL/4, but at most every 0.05 s (Server._evict_loop), so
# a shorter TTL is not kept to; one of 1e-9 expires every session before its next call
MIN_SESSION_TTL = 0.2


def _option(default, group: str | None, help: str, **argparse_kwargs):
    """A ServerConfig field with a default and its `--flag` in `--help` group `group`.

    `argparse_kwargs` (metavar, choices) go to `add_argument` as they are.
    """
    return field(default=default, metadata={"group": group, "help": help, **argparse_kwargs})


@dataclass
class ServerConfig:
    """Settings of one gRPC server process; each field's metadata is its flag's help."""

    model_dir: str = field(
        metadata={"group": None, "help": "exported model directory (from `ssmstream export`)"}
    )
    host: str = _option(
        "127.0.0.1", "network", "address to bind; use 0.0.0.0 to listen on all interfaces"
    )
    port: int = _option(50051, "network", "gRPC port; 0 picks a free one")
    device: str = _option(
        "auto",
        "engine",
        "execution provider: auto uses CUDA when it is usable, else CPU",
        choices=DEVICES,
    )
    threads: int | None = _option(
        None,
        "engine",
        "onnxruntime intra-op threads of the prefill graph (default: all cores available to "
        "this process; the step's: --step-threads)",
    )
    step_threads: int | None = _option(
        None,
        "engine",
        "onnxruntime intra-op threads of the step graph (default: 1, the step runs on the "
        "calling thread with no pool; more can help large batches on many cores)",
    )
    tf32: bool = _option(
        False,
        "engine",
        "on CUDA, let fp32 MatMuls run in TF32 (faster, ~1e-3 relative error); default: exact fp32",
    )
    cuda_graphs: bool = _option(
        False,
        "engine",
        "on CUDA, capture the batched step once per batch bucket (1, 2, 4, ... max_batch) and "
        "replay it: fewer kernel launches per token; default: off",
    )

    max_sessions: int = _option(1024, "sessions", "state slots (sessions in all)")
    max_sessions_per_principal: int = _option(
        0, "sessions", "open sessions one principal may hold; 0: no limit"
    )
    session_ttl: float = _option(
        600.0,
        "sessions",
        f"seconds a session may stay idle before it is evicted (at least {MIN_SESSION_TTL:g})",
    )
    state_dir: str | None = _option(
        None,
        "sessions",
        "save sessions here on shutdown and restore them on start (default: not saved)",
    )
    save_interval: float = _option(
        0.0,
        "sessions",
        "also save sessions to --state-dir every this many seconds; 0: only at shutdown",
    )
    snapshot_key: str | None = _option(
        None,
        "sessions",
        "file holding the key (>= 16 bytes) that signs snapshots and saved sessions "
        "(HMAC-SHA256); default: DIR/snapshot.key of --state-dir (created on first start), "
        "else one key per --state-store Redis, else a random key for this process only",
        metavar="FILE",
    )
    rewind_window: int = _option(
        4096,
        "sessions",
        "inputs a session can be rewound by (RewindSession): checkpoints of its state at most "
        "a prefill chunk apart and its inputs since the oldest one; 0: rewind is off",
    )
    rewind_memory_mb: float = _option(
        1024.0,
        "sessions",
        "MiB of rewind checkpoints all sessions may hold together; past it, the session that "
        "grows drops its own oldest checkpoints (its rewind window shrinks), down to its "
        "newest (one state per session may pass the bound); 0: no limit",
    )
    prefix_cache_mb: float = _option(
        64.0,
        "sessions",
        "MiB of prompt-prefix states kept (least recently used out first), so a prompt "
        "whose prefix was seen is not prefilled again; 0: off",
    )
    prefix_cache_scope: str = _option(
        "principal",
        "sessions",
        "principal: each principal hits only its own entries (no timing side channel "
        "between tenants); global: one cache for everyone",
        choices=("principal", "global"),
    )
    state_store: str = _option(
        "memory",
        "scale-out",
        "where sessions live besides memory: memory (this process only) or "
        "redis://host:port/db (shared by replicas; needs the `redis` extra)",
    )
    persist_every: str = _option(
        "100ms",
        "scale-out",
        "with --state-store redis: 1 = write-through (a step is acknowledged once it is "
        "in Redis); N = every Nth step of a session (a dying replica loses at most N-1 steps "
        "per session); Nms = write behind every N milliseconds",
    )
    lease_ttl: float = _option(
        3.0,
        "scale-out",
        "seconds a replica's ownership of a session lasts unrenewed: the failover time "
        "after a replica dies",
    )
    replica_id: str | None = _option(
        None, "scale-out", "this replica's name in session leases (default: host:pid:random)"
    )
    max_batch: int = _option(
        64,
        "batching",
        "steps of different sessions run as one onnxruntime call; 1 turns batching off",
    )
    max_batch_delay: float = _option(
        0.002, "batching", "seconds a step may wait for others to join its batch"
    )
    max_tokens_per_request: int = _option(
        4096, "limits", "inputs (T) per StepRequest and per Generate prompt"
    )
    max_new_tokens: int = _option(4096, "limits", "upper bound of GenerateRequest.max_new_tokens")
    max_message_bytes: int = _option(
        4 * 1024 * 1024,
        "limits",
        "largest message either way: a larger request is RESOURCE_EXHAUSTED, and so is a "
        "Step whose OUTPUT_ALL response would be larger, before it steps; 4 MiB is what "
        "gRPC clients receive unless told otherwise",
    )
    max_concurrent_rpcs: int = _option(
        0, "limits", "RPCs in flight at once (more: RESOURCE_EXHAUSTED); 0: no limit"
    )
    tls_cert: str | None = _option(
        None, "security", "PEM server certificate (enables TLS; default: plaintext)"
    )
    tls_key: str | None = _option(None, "security", "PEM private key of --tls-cert")
    tls_client_ca: str | None = _option(
        None, "security", "PEM CA bundle: require client certificates signed by it (mTLS)"
    )
    auth_tokens: str | None = _option(
        None,
        "security",
        "file of '<token> <principal>' lines: require 'authorization: Bearer <token>' "
        "metadata; sessions are private to their principal (default: no authentication)",
    )
    metrics_port: int | None = _option(
        None,
        "operations",
        "serve Prometheus metrics over HTTP on this port (0 picks one); off when unset",
    )
    grace: float = _option(
        10.0, "operations", "seconds in-flight requests get to finish after SIGTERM/SIGINT/SIGHUP"
    )
    keepalive: float = _option(
        60.0,
        "network",
        "seconds between the server's HTTP/2 pings on a connection with calls open: a client "
        "that stops answering (frozen, or gone without closing its socket) is disconnected "
        "--keepalive-timeout later and its calls end; 0 turns the pings off",
    )
    keepalive_timeout: float = _option(
        20.0, "network", "seconds a client has to answer a keepalive ping"
    )
    max_connection_idle: float = _option(
        600.0,
        "network",
        "seconds a connection may stay open with no call before the server closes it (clients "
        "reconnect on their next call); 0: never",
    )
    port_file: str | None = _option(
        None,
        "network",
        "once serving, write {'port': ..., 'metrics_port': ..., 'pid': ..., 'instance': ...} as "
        "JSON to this file; removed at stop",
    )
    log_level: str = _option("INFO", "operations", "logging level", choices=LOG_LEVELS)

    def __post_init__(self):
        # upper bounds: what grpc's int options (int32) and ModelInfo.limits (uint32) can hold
        for name, low, high in (
            ("max_sessions", 1, UINT32),
            ("max_batch", 1, UINT32),
            ("max_tokens_per_request", 1, UINT32),
            ("max_new_tokens", 1, UINT32),
            ("max_message_bytes", 1, INT32),
            ("max_sessions_per_principal", 0, UINT32),
            ("max_concurrent_rpcs", 0, INT32),
            ("rewind_window", 0, UINT32),
        ):
            _check_int(name, getattr(self, name), low=low, high=high)
        _check_int("port", self.port, low=0, high=65535)
        if self.metrics_port is not None:
            _check_int("metrics_port", self.metrics_port, low=0, high=65535)
        for name in ("threads", "step_threads"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), low=1, high=MAX_THREADS)
        for name in ("prefix_cache_mb", "rewind_memory_mb"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < 2**20:
                raise ValueError(f"{name}: must be in [0, 2**20) MiB, got {value!r}")
        if self.prefix_cache_scope not in ("principal", "global"):
            raise ValueError(
                f"prefix_cache_scope: must be principal or global, got {self.prefix_cache_scope!r}"
            )
        for name, low in (
            ("session_ttl", MIN_SESSION_TTL),
            ("max_batch_delay", 0),
            ("grace", 0),
            ("save_interval", 0),
        ):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name}: must be a finite number of seconds, got {value!r}")
            if not low <= value <= MAX_SECONDS:
                raise ValueError(
                    f"{name}: must be >= {low:g} and <= {MAX_SECONDS:g} seconds, got {value}"
                )
        for name, off in (
            ("keepalive", 0),
            ("keepalive_timeout", None),
            ("max_connection_idle", 0),
        ):
            value = getattr(self, name)  # whole milliseconds, as grpc takes them
            if not _is_number(value) or not (value == off or 0.001 <= value <= MAX_GRPC_SECONDS):
                zero = "0 or " if off == 0 else ""
                raise ValueError(
                    f"{name}: must be {zero}in [0.001, {MAX_GRPC_SECONDS}] seconds, got {value!r}"
                )
        if self.max_batch_delay >= 10:
            raise ValueError(f"max_batch_delay: must be < 10 seconds, got {self.max_batch_delay}")
        for name in (  # a blank path (an unset $VAR) must not turn the feature off quietly
            "state_dir", "snapshot_key", "tls_cert", "tls_key", "tls_client_ca", "auth_tokens",
            "port_file", "replica_id",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise ValueError(f"{name}: must not be empty (leave the flag out instead)")
        if self.save_interval > 0 and not self.state_dir:
            raise ValueError("save_interval: periodic saves need --state-dir (where to save)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert/tls_key: give both the certificate and its key, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca: mTLS needs --tls-cert/--tls-key as well")
        if self.device not in DEVICES:
            raise ValueError(f"device: must be auto, cpu or cuda, got {self.device!r}")
        if self.host.startswith("[") and self.host.endswith("]"):  # [::1]: the bare literal
            self.host = self.host[1:-1]
        if not self.host:
            raise ValueError("host: must not be empty")
        full = _shorthand_ipv4(self.host)
        if full is not None:
            raise ValueError(
                f"host: {self.host!r} is an IPv4 address written short, which gRPC reads "
                f"otherwise or not at all; write it in full (the system reads it as {full})"
            )
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(f"metrics_port: {self.metrics_port} is the gRPC --port too")
        if self.state_store != "memory":
            if not self.state_store.startswith(("redis://", "rediss://", "unix://")):
                # the error is printed and logged: only the scheme, as written, is shown (a
                # URL mistyped, "redis:/u:PASSWORD@h", does not parse to hide its password)
                scheme, sep, _ = self.state_store.partition("://")
                if sep and not set(scheme) & set(":@/"):
                    shown = f"one that starts {scheme + sep!r}"
                else:
                    shown = "a value that does not start with a scheme (such as redis://)"
                raise ValueError(
                    f"state_store: must be memory or a redis://host:port/db URL, got {shown} "
                    "(the rest is not shown: it may hold a password)"
                )
            if self.state_dir is not None:
                raise ValueError(
                    "state_dir: sessions persist in --state-store; do not also give --state-dir"
                )
        from .replication import parse_persist_every

        parse_persist_every(self.persist_every)
        if not _is_number(self.lease_ttl) or not 0.05 <= self.lease_ttl <= 3600:
            raise ValueError(f"lease_ttl: must be in [0.05, 3600] seconds, got {self.lease_ttl!r}")

    @property
    def address(self) -> str:
        """host:port as grpc wants it (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def prefix_cache_bytes(self) -> int:
        """--prefix-cache-mb in bytes, rounded up (what the cache holds and GetModelInfo says)."""
        return math.ceil(self.prefix_cache_mb * 2**20)


INT32, UINT32 = 2**31 - 1, 2**32 - 1
MAX_SECONDS = 1e9  # about 31 years: larger durations overflow Redis's millisecond expiries


def _is_number(value) -> bool:
    """int or float, not bool (True is an int to Python, not a number of seconds to us)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shorthand_ipv4(host: str) -> str | None:
    """The dotted quad the system reads in an IPv4 address written short ("0", "127.1",
    "0x7f.1", "0127.0.0.1": octal), or None. gRPC's resolver (c-ares) takes most of these
    for names it cannot find, so the bind fails once the model has loaded, and reads leading
    zeros as decimal: another address than the system's."""
    if any(c.isspace() for c in host):  # inet_aton ignores what follows a space
        return None
    try:
        ipaddress.ip_address(host)
        return None  # written in full
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except (OSError, ValueError):  # a name (ValueError: a NUL or a lone surrogate)
        return None


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        upper = f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name}: must be >= {low}{upper}, got {value}")


def _add_flag(group, f: dataclasses.Field, kind: type) -> None:
    """One argparse argument for field `f`: `--field-name`, typed by its annotation."""
    meta = {k: v for k, v in f.metadata.items() if k != "group"}
    if f.metadata["group"] is None:
        group.add_argument(f.name, type=kind, **meta)
    elif kind is bool:
        action = group.add_argument(
            _flag_name(f.name), action=argparse.BooleanOptionalAction, default=f.default, **meta
        )
        action.help = meta.get("help")  # Python 3.10's action appends "(default: …)" itself
    else:
        group.add_argument(_flag_name(f.name), type=kind, default=f.default, **meta)


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_type(hint) -> type:
    """`int | None` -> int; a plain str/int/float/bool stays itself."""
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if len(kinds) != 1 or kinds[0] not in (str, int, float, bool):
        raise TypeError(f"no flag type for annotation {hint!r}")
    return kinds[0]


def build_parser() -> argparse.ArgumentParser:
    """The `ssmstream serve` argument parser: one argument per ServerConfig field, built
    from the field's type, default and metadata (help, group, metavar, choices)."""
    p = argparse.ArgumentParser(
        prog="ssmstream serve",
        # short: a usage error's line is not lost under 30 lines of every flag (--help has them)
        usage="%(prog)s MODEL_DIR [options]",
        description=(
            "Serve an exported SSM model (step.onnx + prefill.onnx + manifest.json) over "
            "gRPC (service ssmstream.v1.StreamingInference), keeping one hidden state per "
            "session. Also serves grpc.health.v1, server reflection and, with "
            "--metrics-port, Prometheus metrics."
        ),
        formatter_class=HelpFormatter,
    )
    hints = typing.get_type_hints(ServerConfig)
    fields = dataclasses.fields(ServerConfig)
    unknown = {f.metadata["group"] for f in fields} - {None, *GROUPS}
    if unknown:
        raise ValueError(f"ServerConfig fields name undeclared flag groups: {sorted(unknown)}")
    for f in fields:  # positionals first, in the parser itself
        if f.metadata["group"] is None:
            _add_flag(p, f, _field_type(hints[f.name]))
    for title, description in GROUPS.items():
        g = p.add_argument_group(title, description)
        for f in fields:
            if f.metadata["group"] == title:
                _add_flag(g, f, _field_type(hints[f.name]))
    return p


def parse_config(argv: list[str] | None = None) -> ServerConfig:
    """argv → ServerConfig; a bad value exits with a usage error naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return ServerConfig(**vars(args))
    except ValueError as e:
        parser.error(with_flags(str(e)))
        raise  # parser.error exits; this keeps type checkers informed


def with_flags(message: str) -> str:
    """A message "field: what" (or "a/b: what") about ServerConfig fields, said of their flags:
    "--field: what"; any other message as it is."""
    return said_of_flags(message, {n: _flag_name(n) for n in config_fields()})


def config_fields() -> list[str]:
    """Names of every ServerConfig field (a test checks each has a flag)."""
    return [f.name for f in dataclasses.fields(ServerConfig)]
