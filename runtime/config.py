"""ServerConfig: every setting of `ssmstream serve`, one dataclass, one flag per field.

`build_parser()` maps flags onto the fields (the `--help` text is the reference);
`ServerConfig.__post_init__` validates them and names the offending field, so a config
built in Python (tests, benchmarks, embedding) is checked the same way as one from argv.

Units: seconds for times, bytes for sizes; 0 means "off / no limit" where noted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass


@dataclass
class ServerConfig:
    """Settings of one gRPC server process (see `build_parser` for each flag's help)."""

    model_dir: str
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    threads: int | None = None
    # sessions
    max_sessions: int = 1024
    max_sessions_per_principal: int = 0
    session_ttl: float = 600.0
    state_dir: str | None = None
    save_interval: float = 0.0
    snapshot_key: str | None = None
    # scale-out: sessions shared by replicas
    state_store: str = "memory"
    persist_every: str = "100ms"
    lease_ttl: float = 3.0
    replica_id: str | None = None
    # batching
    max_batch: int = 64
    max_batch_delay: float = 0.002
    # request limits
    max_tokens_per_request: int = 4096
    max_new_tokens: int = 4096
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_rpcs: int = 0
    # security
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_tokens: str | None = None
    # operations
    metrics_port: int | None = None
    grace: float = 10.0
    port_file: str | None = None
    log_level: str = "INFO"

    def __post_init__(self):
        for name in (
            "max_sessions",
            "max_batch",
            "max_tokens_per_request",
            "max_new_tokens",
            "max_message_bytes",
        ):
            _check_int(name, getattr(self, name), low=1)
        for name in ("max_sessions_per_principal", "max_concurrent_rpcs"):
            _check_int(name, getattr(self, name), low=0)
        _check_int("port", self.port, low=0, high=65535)
        if self.metrics_port is not None:
            _check_int("metrics_port", self.metrics_port, low=0, high=65535)
        if self.threads is not None:
            _check_int("threads", self.threads, low=1)
        for name, low_exclusive in (
            ("session_ttl", True),
            ("max_batch_delay", False),
            ("grace", False),
            ("save_interval", False),
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: must be a finite number of seconds, got {value!r}")
            if value < 0 or (low_exclusive and value == 0):
                bound = "> 0" if low_exclusive else ">= 0"
                raise ValueError(f"{name}: must be {bound} seconds, got {value}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert/tls_key: give both the certificate and its key, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca: mTLS needs --tls-cert/--tls-key as well")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: must be auto, cpu or cuda, got {self.device!r}")
        if not self.host:
            raise ValueError("host: must not be empty")
        if self.state_store != "memory":
            if not self.state_store.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError(
                    f"state_store: must be memory or a redis://host:port/db URL, "
                    f"got {self.state_store!r}"
                )
            if self.state_dir is not None:
                raise ValueError(
                    "state_dir: sessions persist in --state-store; do not also give --state-dir"
                )
        from .shared_store import parse_persist_every

        parse_persist_every(self.persist_every)
        if not isinstance(self.lease_ttl, (int, float)) or not 0.05 <= self.lease_ttl <= 3600:
            raise ValueError(f"lease_ttl: must be in [0.05, 3600] seconds, got {self.lease_ttl!r}")

    @property
    def address(self) -> str:
        """host:port as grpc wants it (IPv6 literals bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        upper = f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name}: must be >= {low}{upper}, got {value}")


def build_parser() -> argparse.ArgumentParser:
    """The `ssmstream serve` argument parser; every dest is a ServerConfig field."""
    d = ServerConfig(model_dir="")
    p = argparse.ArgumentParser(
        prog="ssmstream serve",
        description=(
            "Serve an exported SSM model (step.onnx + prefill.onnx + manifest.json) over "
            "gRPC (service ssmstream.v1.StreamingInference), keeping one hidden state per "
            "session. Also serves grpc.health.v1, server reflection and, with "
            "--metrics-port, Prometheus metrics."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model_dir", help="exported model directory (from `ssmstream export`)")
    g = p.add_argument_group("network")
    g.add_argument(
        "--host", default=d.host, help="address to bind; use 0.0.0.0 to listen on all interfaces"
    )
    g.add_argument("--port", type=int, default=d.port, help="gRPC port; 0 picks a free one")
    g.add_argument(
        "--port-file",
        default=d.port_file,
        help="once serving, write {'port': ..., 'metrics_port': ...} as JSON to this file",
    )
    g = p.add_argument_group("engine")
    g.add_argument(
        "--device",
        default=d.device,
        choices=("auto", "cpu", "cuda"),
        help="execution provider: auto uses CUDA when it is usable, else CPU",
    )
    g.add_argument("--threads", type=int, default=d.threads, help="onnxruntime intra-op threads")
    g = p.add_argument_group("sessions")
    g.add_argument(
        "--max-sessions", type=int, default=d.max_sessions, help="state slots (sessions in all)"
    )
    g.add_argument(
        "--max-sessions-per-principal",
        type=int,
        default=d.max_sessions_per_principal,
        help="open sessions one principal may hold; 0: no limit",
    )
    g.add_argument(
        "--session-ttl",
        type=float,
        default=d.session_ttl,
        help="seconds a session may stay idle before it is evicted",
    )
    g.add_argument(
        "--state-dir",
        default=d.state_dir,
        help="save sessions here on shutdown and restore them on start",
    )
    g.add_argument(
        "--save-interval",
        type=float,
        default=d.save_interval,
        help="also save sessions to --state-dir every this many seconds; 0: only at shutdown",
    )
    g.add_argument(
        "--snapshot-key",
        metavar="FILE",
        default=d.snapshot_key,
        help="file holding the key (>= 16 bytes) that signs snapshots and saved sessions "
        "(HMAC-SHA256); default: DIR/snapshot.key of --state-dir (created on first start), "
        "else one key per --state-store Redis, else a random key for this process only",
    )
    g = p.add_argument_group(
        "scale-out",
        "Several replicas behind a sticky gRPC proxy (deploy/) share sessions through Redis: "
        "any replica can continue any session.",
    )
    g.add_argument(
        "--state-store",
        default=d.state_store,
        help="where sessions live besides memory: memory (this process only) or "
        "redis://host:port/db (shared by replicas; needs the `redis` extra)",
    )
    g.add_argument(
        "--persist-every",
        default=d.persist_every,
        help="with --state-store redis: 1 = write-through (a step is acknowledged once it is "
        "in Redis); N = every Nth step of a session (a dying replica loses at most N-1 steps "
        "per session); Nms = write behind every N milliseconds",
    )
    g.add_argument(
        "--lease-ttl",
        type=float,
        default=d.lease_ttl,
        help="seconds a replica's ownership of a session lasts unrenewed: the failover time "
        "after a replica dies",
    )
    g.add_argument(
        "--replica-id",
        default=d.replica_id,
        help="this replica's name in session leases (default host:pid:random)",
    )
    g = p.add_argument_group("batching")
    g.add_argument(
        "--max-batch",
        type=int,
        default=d.max_batch,
        help="steps of different sessions run as one onnxruntime call; 1 turns batching off",
    )
    g.add_argument(
        "--max-batch-delay",
        type=float,
        default=d.max_batch_delay,
        help="seconds a step may wait for others to join its batch",
    )
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-tokens-per-request",
        type=int,
        default=d.max_tokens_per_request,
        help="inputs (T) per StepRequest and per Generate prompt",
    )
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help="upper bound of GenerateRequest.max_new_tokens",
    )
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=d.max_message_bytes,
        help="largest request message accepted (larger: RESOURCE_EXHAUSTED)",
    )
    g.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=d.max_concurrent_rpcs,
        help="RPCs in flight at once (more: RESOURCE_EXHAUSTED); 0: no limit",
    )
    g = p.add_argument_group("security")
    g.add_argument("--tls-cert", default=d.tls_cert, help="PEM server certificate (enables TLS)")
    g.add_argument("--tls-key", default=d.tls_key, help="PEM private key of --tls-cert")
    g.add_argument(
        "--tls-client-ca",
        default=d.tls_client_ca,
        help="PEM CA bundle: require client certificates signed by it (mTLS)",
    )
    g.add_argument(
        "--auth-tokens",
        default=d.auth_tokens,
        help=(
            "file of '<token> <principal>' lines: require 'authorization: Bearer <token>' "
            "metadata; sessions are private to their principal"
        ),
    )
    g = p.add_argument_group("operations")
    g.add_argument(
        "--metrics-port",
        type=int,
        default=d.metrics_port,
        help="serve Prometheus metrics over HTTP on this port (0 picks one); off when unset",
    )
    g.add_argument(
        "--grace",
        type=float,
        default=d.grace,
        help="seconds in-flight requests get to finish after SIGTERM/SIGINT",
    )
    g.add_argument(
        "--log-level",
        default=d.log_level,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level",
    )
    return p


def parse_config(argv: list[str] | None = None) -> ServerConfig:
    """argv → ServerConfig; a bad value exits with a usage error naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return ServerConfig(**vars(args))
    except ValueError as e:
        field = str(e).split(":", 1)[0]
        flag = "--" + field.replace("_", "-").replace("/", "/--")
        parser.error(f"{flag}: {str(e).split(':', 1)[1].strip()}")
        raise  # parser.error exits; this keeps type checkers informed


def config_fields() -> list[str]:
    """Names of every ServerConfig field (a test checks each has a flag)."""
    return [f.name for f in dataclasses.fields(ServerConfig)]
