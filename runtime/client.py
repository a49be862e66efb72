"""Python client of ssmstream.v1.StreamingInference, sync and asyncio (`ssmstream generate`
is runtime/generate.py).

    from ssmstream.runtime.client import Client
    with Client("127.0.0.1:50051", token=None) as c:
        s = c.create_session()
        r = s.step(tokens=[72, 105])            # StepResult: outputs [1, D], position 2
        with s.open_stream() as st:             # bidi Stream, one request per send()
            r = st.send(tokens=[33])
        for g in s.generate([10], max_new_tokens=20, temperature=0.8, seed=0):
            ...                                 # GenerateResponse per token
        snap = s.snapshot(); s2 = c.restore(snap); s3 = s.fork(); s.close()

`AsyncClient` / `AsyncClientSession` are the same API with `await` (and `async for`).
Errors are `grpc.RpcError` with the server's status code and a message naming the field; an
argument the client checks itself (its type, the range its field holds) raises ValueError
naming the argument, before any request is sent.

Closed clients: a call that close() ends, or one made after it, raises `grpc.RpcError`
CANCELLED "the client was closed" (a stream handle's send: "the stream's client was closed"),
in both clients. An `AsyncClient` may be made outside any event loop (at module level): its
channel opens on the first call, in that call's loop, and again in a later loop (successive
`asyncio.run()` calls); a loop of another thread is refused (RuntimeError) while the loop
the channel was opened in still runs. A session handle's `position` is the server's answer
to its latest call, also when threads call through it at once (an answer that arrives after
a further one does not take it back). An asyncio call that is cancelled (a timeout
included) raises CancelledError (TimeoutError): a session that a cancelled `create_session`,
`restore` or `fork` may have made under an id this client chose is closed again.

TLS: `tls=True` (system roots) or `root_certificates=PEM path/bytes`; mTLS adds
`client_cert` and `client_key`. Auth: `token=` (a str of visible ASCII; None or "": no
token) sends `authorization: Bearer <token>`.

Scale-out: every call about a session sends `x-session-id: <id>` metadata, which a sticky
proxy hashes (deploy/nginx); new session ids are chosen here (uuid4) so that even the
call that creates a session reaches the replica that will serve it.

Dimension letters: T inputs per request, D output width, I d_input.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import ssl
import threading
import uuid
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from ssmstream.protos import inference_pb2 as pb
from ssmstream.protos import inference_pb2_grpc as pb_grpc

from .errors import as_array, as_tokens, check_session_id, integer
from .keepalive import MAX_SECONDS as MAX_KEEPALIVE
from .keepalive import MIN_CLIENT_PING_INTERVAL, keepalive_options
from .sampling import check_params
from .snapshots import BYTES_LIKE, BytesLike

OUTPUTS = {
    "last": pb.OUTPUT_LAST,
    "all": pb.OUTPUT_ALL,
    "top_k": pb.OUTPUT_TOP_K,
    "none": pb.OUTPUT_NONE,
}


@dataclass
class StepResult:
    """One StepResponse as arrays.

    outputs: float32 [rows, D] (rows = 1 for "last", T for "all"), None otherwise.
    top_tokens / top_logprobs: int64 [K] / float32 [K] for "top_k", else empty.
    """

    session_id: str
    position: int
    outputs: np.ndarray | None = None
    top_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    top_logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    @classmethod
    def from_proto(cls, r: pb.StepResponse) -> StepResult:
        """The arrays of a StepResponse (its flat `outputs` reshaped to [rows, cols])."""
        out = None
        if r.rows:
            out = np.asarray(r.outputs, dtype=np.float32).reshape(r.rows, r.cols)  # [rows, D]
        return cls(
            session_id=r.session_id,
            position=int(r.position),
            outputs=out,
            top_tokens=np.asarray(r.top_tokens, dtype=np.int64),
            top_logprobs=np.asarray(r.top_logprobs, dtype=np.float32),
        )


def _ints(name: str, xs) -> list[int]:
    """Token ids as ints, row-major (bytes are ids 0..255, as a byte-level model reads
    them); ValueError naming `name` for anything but integers (a float is not truncated)."""
    a = as_tokens(xs if xs is not None else [], name)  # ragged, or a bool among ints: named
    if a.dtype.kind in "fO" and isinstance(xs, (list, tuple)) and all(type(x) is int for x in xs):
        # Python ints past int64, which numpy made floats or objects
        wide = next((x for x in xs if not -(2**63) <= x <= 2**63 - 1), None)
        if wide is not None:
            raise ValueError(f"{name}: must fit in int64, got {wide!r}")
    if a.ndim == 0 and isinstance(xs, Iterator):  # numpy keeps it whole, as one object
        raise ValueError(
            f"{name}: must be a list, bytes or an array of integers, got a "
            f"{type(xs).__name__} (make it a list first)"
        )
    if isinstance(xs, str):  # text, where a byte-level model reads bytes
        raise ValueError(
            f"{name}: must be integers (token ids), got the text {xs!r}; "
            "a byte-level model takes its bytes (b'...', or text.encode())"
        )
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"{name}: must be integers, got {_not_an_integer(a, xs)!r} ({a.dtype})")
    if a.size and (a.min() < -(2**63) or a.max() > 2**63 - 1):  # would wrap in int64
        raise ValueError(f"{name}: must fit in int64, got {a.max()!r}")
    return a.astype(np.int64).reshape(-1).tolist()


def _not_an_integer(a: np.ndarray, xs):
    """The first item of `a` (numpy's array of `xs`, what was given) that is not an integer:
    an error names it, not the first item ([1, None] is an object array whose first item is
    fine, [1, 2.5] a float one); the first item where none is found (a float array of whole
    numbers: 1.0 is no token id either)."""
    flat = a.reshape(-1)
    if a.dtype.kind in "US":  # numpy made every item a str: the first that was one
        bad = (x for x in _leaves(xs) if isinstance(x, str))
    elif a.dtype.kind == "O":
        ok = (int, np.integer)
        bad = (x for x in flat if isinstance(x, bool) or not isinstance(x, ok))
    elif a.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = iter(flat[~(flat == np.round(flat))])
    else:
        bad = iter(())
    first = next(bad, flat[0])
    return first.item() if isinstance(first, np.generic) else first


def _leaves(xs):
    """The items of nested lists and tuples `xs`, row-major (numpy's order); nothing for
    anything else (an array of str: each item is one)."""
    for x in xs if isinstance(xs, (list, tuple)) else ():
        if isinstance(x, (list, tuple)):
            yield from _leaves(x)
        else:
            yield x


def _session_id(name: str, v) -> str:
    """A session id field: "" (none: the server or choose_session_id picks one) or an id the
    server accepts (errors.check_session_id), else ValueError naming `name` (an id HTTP/2
    metadata cannot carry, as "é" or one with a newline, failed with INTERNAL)."""
    if not isinstance(v, str):
        raise ValueError(f"{name}: must be a string, got {v!r}")
    return check_session_id(v, name) if v else v


def _bytes(name: str, v) -> bytes:
    """bytes, bytearray or memoryview as bytes; ValueError naming `name` for anything else."""
    if not isinstance(v, BYTES_LIKE):
        raise ValueError(f"{name}: must be bytes, got {type(v).__name__}")
    return bytes(v)


def _count(name: str, v, high: int = 2**32 - 1) -> int:
    """An integer >= 0 that fits the proto's unsigned field (at most `high`); ValueError
    naming `name`. The range a field allows is the server's (check_generate states it)."""
    n = integer(v, name)
    if n > high:
        raise ValueError(f"{name}: must be at most {high} (the largest its field holds), got {n}")
    return n


def _number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: must be a number, got {v!r}")
    try:
        return float(v)
    except OverflowError:  # an int past float's range
        raise ValueError(f"{name}: must be a number in float range, got {v!r}") from None


def _ttl(ttl) -> float:
    """A session's idle seconds: None or 0 is the server's default (as SessionService takes it)."""
    return 0.0 if ttl is None else _number("ttl", ttl)


# the smallest positive float32: a top_p below it would be 0 on the wire, which means "off"
_TINY = float(np.nextafter(np.float32(0), np.float32(1)))


def _probability(name: str, v) -> float:
    """A float32 field where 0 means "off": a positive value it would round to 0 is sent as
    the smallest positive float32 (the same nucleus: the most probable token)."""
    p = _number(name, v)
    return _TINY if 0 < p < _TINY else p


def _timeout(v) -> float | None:
    """Seconds per call: None or inf (or more than grpc's deadlines reach, 1e9 s) is no
    limit; ValueError for a non-positive or NaN one (grpc failed every call with it)."""
    if v is None:
        return None
    t = _number("timeout", v)
    if not t > 0:
        raise ValueError(f"timeout: must be > 0 seconds (None or inf: no limit), got {v!r}")
    return None if t >= 1e9 else t


def _keepalive(seconds, timeout) -> list[tuple[str, int]]:
    """The channel's keepalive options; ValueError naming `keepalive` (0 or at least
    MIN_CLIENT_PING_INTERVAL: a server refuses pings more often, with GOAWAY) or
    `keepalive_timeout` (> 0)."""
    s, t = _number("keepalive", seconds), _number("keepalive_timeout", timeout)
    if not (s == 0 or MIN_CLIENT_PING_INTERVAL <= s <= MAX_KEEPALIVE):
        raise ValueError(
            f"keepalive: must be 0 (no pings) or in [{MIN_CLIENT_PING_INTERVAL:g}, "
            f"{MAX_KEEPALIVE}] seconds, got {seconds!r}"
        )
    if not 0.001 <= t <= MAX_KEEPALIVE:
        raise ValueError(
            f"keepalive_timeout: must be in [0.001, {MAX_KEEPALIVE}] seconds, got {timeout!r}"
        )
    return keepalive_options(s, t)


def _token(token: str) -> str:
    """A bearer token as HTTP/2 metadata carries it: visible ASCII (a trailing newline from a
    file, a space or a non-ASCII character made every call fail with INTERNAL)."""
    if not isinstance(token, str):  # bytes would go out as "Bearer b'...'"
        raise ValueError(
            f"token: must be a str (None: no token), got {type(token).__name__}"
            + ("; decode it first" if isinstance(token, (bytes, bytearray)) else "")
        )
    if not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError("token: must be visible ASCII characters (no blanks, no newline)")
    return token


def step_request(
    session_id: str = "",
    tokens: Sequence[int] | np.ndarray | None = None,
    values: Sequence[float] | np.ndarray | None = None,
    output: str = "last",
    top_k: int = 0,
) -> pb.StepRequest:
    """A StepRequest: `tokens` int [T], or `values` float [T, I] (flattened row-major)."""
    if not isinstance(output, str) or output not in OUTPUTS:
        raise ValueError(f"output: must be one of {sorted(OUTPUTS)}, got {output!r}")
    req = pb.StepRequest(
        session_id=_session_id("session_id", session_id),
        output=OUTPUTS[output],
        top_k=_count("top_k", top_k),
    )
    # the server's rule, said in this API's words (it says output=OUTPUT_TOP_K)
    if req.top_k and output != "top_k":
        raise ValueError(f"top_k: is only used with output='top_k', got output={output!r}")
    if not req.top_k and output == "top_k":
        raise ValueError("top_k: must be >= 1 with output='top_k'")
    if tokens is not None:
        req.tokens.extend(_ints("tokens", tokens))
    if values is not None:
        v = as_array(values, "values")  # ragged, or a bool among floats: named
        try:
            if v.size and v.dtype.kind not in "fiu":  # not bools or numeric strings either
                raise TypeError(f"got {v.dtype}")
            with np.errstate(over="ignore"):  # past float32's range: refused below
                f = v.astype(np.float32).reshape(-1)
        except (TypeError, ValueError) as e:
            raise ValueError(f"values: must be real numbers ({e})") from None
        big = v.reshape(-1)[np.isinf(f) & np.isfinite(v.reshape(-1))]  # (sent as inf, before)
        if big.size:
            raise ValueError(f"values: must fit in float32 (|x| <= 3.4e38), got {float(big[0])!r}")
        req.values.extend(f.tolist())
    return req


def generate_request(
    session_id: str,
    prompt: Sequence[int] | np.ndarray,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[int] | np.ndarray = (),
    keep_session: bool = False,
) -> pb.GenerateRequest:
    """A GenerateRequest; ValueError naming the argument for a value of the wrong type or
    outside its field (the server checks the ranges it allows)."""
    req = pb.GenerateRequest(
        session_id=_session_id("session_id", session_id),
        prompt=_ints("prompt", prompt),
        max_new_tokens=_count("max_new_tokens", max_new_tokens),
        temperature=_number("temperature", temperature),
        top_k=_count("top_k", top_k),
        top_p=_probability("top_p", top_p),
        stop_tokens=_ints("stop", stop),
        keep_session=bool(keep_session),
    )
    if seed is not None:
        req.seed = _count("seed", seed, 2**64 - 1)
    return req


def create_request(
    session_id: str,
    ttl: float = 0.0,
    snapshot: BytesLike = b"",
    prompt: Sequence[int] | np.ndarray = (),
) -> pb.CreateSessionRequest:
    """A CreateSessionRequest; ValueError naming the argument, as generate_request."""
    return pb.CreateSessionRequest(
        session_id=_session_id("session_id", session_id),
        ttl_seconds=_ttl(ttl),
        snapshot=_bytes("snapshot", snapshot),
        prompt=_ints("prompt", prompt),
    )


def check_generate(req: pb.GenerateRequest, info: pb.ModelInfo) -> pb.GenerateRequest:
    """The ranges the server checks a GenerateRequest against (ValueError naming the field),
    checked before a call that must not half-happen (regenerate: its rewind comes first)."""
    if info.input_kind != "tokens":
        raise ValueError("prompt: Generate needs a token model; this model takes values")
    V, limits = info.vocab_size, info.limits
    if info.d_output > V:
        raise ValueError(
            f"prompt: Generate samples token ids from the outputs; d_output={info.d_output} "
            f"is more than vocab_size={V}"
        )
    if not 1 <= len(req.prompt) <= limits.max_tokens_per_request:
        raise ValueError(
            f"prompt: needs 1 to {limits.max_tokens_per_request} tokens (the server's "
            f"--max-tokens-per-request), got {len(req.prompt)}"
        )
    if not 1 <= req.max_new_tokens <= limits.max_new_tokens:
        raise ValueError(
            f"max_new_tokens: must be an integer in [1, {limits.max_new_tokens}], "
            f"got {req.max_new_tokens}"
        )
    if len(req.stop_tokens) > V:  # repeats count, as on the server
        raise ValueError(f"stop: has more than vocab_size={V} tokens")
    for name, ids in (("prompt", req.prompt), ("stop", req.stop_tokens)):
        bad = next((t for t in ids if not 0 <= t < V), None)
        if bad is not None:  # as the server says it
            raise ValueError(f"{name}: token {bad} is outside [0, vocab_size={V})")
    if req.top_k > V:
        raise ValueError(f"top_k: must be in [0, vocab_size={V}] (0: off), got {req.top_k}")
    if limits.max_message_bytes and req.ByteSize() > limits.max_message_bytes:
        raise ValueError(
            f"prompt: the request is {req.ByteSize()} bytes, more than the server's "
            f"max_message_bytes={limits.max_message_bytes}"
        )
    check_params(req.temperature, req.top_k, req.top_p or 1.0)  # InvalidInput: a ValueError
    return req


PROMPT_IGNORED = (
    "prompt: the server created the session without it (a server older than this client, "
    "which has no prompt field?); the session was closed"
)


def _prompt_ignored(req: pb.CreateSessionRequest, s: pb.Session) -> bool:
    """A server drops a field it does not know: a session created from a prompt is at the
    prompt's length, and one given a prompt and a snapshot is refused (INVALID_ARGUMENT) by
    a server that knows prompts."""
    n = len(req.prompt)
    return n > 0 and (bool(req.snapshot) or s.position != n)


def _pem(value: str | os.PathLike | bytes | None, field: str) -> bytes | None:
    """PEM bytes, or a PEM file's; ValueError naming `field` for a file it cannot read or
    what is not PEM (grpc's core aborted the process on an empty key or certificate)."""
    if value is None:
        return None
    if isinstance(value, BYTES_LIKE):
        data, where = bytes(value), "the bytes given"
    else:
        try:
            data, where = Path(value).read_bytes(), repr(str(value))
        except OSError as e:
            raise ValueError(f"{field}: cannot read {str(value)!r}: {e.strerror or e}") from e
    if b"-----BEGIN " not in data:
        raise ValueError(f"{field}: {where} is not PEM (no '-----BEGIN ' line)")
    if b"ENCRYPTED" in data:  # "BEGIN ENCRYPTED PRIVATE KEY" / "Proc-Type: 4,ENCRYPTED"
        raise ValueError(
            f"{field}: {where} is encrypted (has a passphrase); gRPC needs a plain key"
        )
    return data


def _ca(value, field: str) -> bytes | None:
    """`_pem` of CA certificates that OpenSSL can load (else the channel failed only at
    connect, UNAVAILABLE, naming no flag)."""
    data = _pem(value, field)
    if data is not None:
        try:
            # PEM blocks are ASCII; comments (an issuer's name) may not be: dropped
            ssl.create_default_context(cadata=data.decode("ascii", "ignore"))
        except (ssl.SSLError, ValueError, TypeError) as e:
            raise ValueError(f"{field}: holds no certificate OpenSSL can load ({e})") from None
    return data


# one TCP address: host:port, [v6]:port, dns:[//authority/]host:port, ipv4:a:port, ipv6:[a]:port
# (other targets, as unix:/path, vsock:cid:port or lists of addresses, are taken as given)
_TCP_TARGET = re.compile(r"(?:dns:(?://[^/]*/)?|ipv4:|ipv6:)?(\[[^\]]*\]|[^:\[\]/]*):(\d+)")


def _target(target) -> str:
    """A gRPC target; ValueError for one that is not a string, or a TCP port outside
    [1, 65535] (grpc took it modulo 65536: another server)."""
    if not isinstance(target, str) or not target:
        raise ValueError(f"target (--server): must be host:port, got {target!r}")
    tcp = _TCP_TARGET.fullmatch(target)
    if tcp and not 1 <= int(tcp.group(2)) <= 65535:
        raise ValueError(f"target (--server): port {tcp.group(2)} is outside [1, 65535]")
    return target


def channel_credentials(
    tls: bool = False,
    root_certificates: str | os.PathLike | bytes | None = None,
    client_cert: str | os.PathLike | bytes | None = None,
    client_key: str | os.PathLike | bytes | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials (None: plaintext). Any certificate argument implies TLS; an empty one
    (an unset variable) is refused, not taken as "not given" (plaintext)."""
    for name, v in (("root_certificates", root_certificates), ("client_cert", client_cert),
                    ("client_key", client_key)):  # fmt: skip
        if v is not None and not (bytes(v) if isinstance(v, BYTES_LIKE) else str(v)):
            raise ValueError(f"{name}: is empty (give a PEM file or bytes, or leave it out)")
    if not (
        tls or root_certificates is not None or client_cert is not None or client_key is not None
    ):
        return None
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert/client_key: give both for mTLS, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_ca(root_certificates, "root_certificates (--tls-ca)"),
        private_key=_pem(client_key, "client_key (--tls-key)"),
        certificate_chain=_pem(client_cert, "client_cert (--tls-cert)"),
    )


def _options(options) -> list[tuple[str, object]]:
    """grpc channel options: (name, value) pairs (None: none), else ValueError naming
    `options` (grpc failed with a bare unpacking error, the asyncio client only at its first
    call, and took a two-character string as a pair)."""
    if options is None:
        return []
    if isinstance(options, (str, bytes, dict)) or not isinstance(options, Iterable):
        raise ValueError(
            f"options: must be (name, value) pairs, as grpc's channel options, got {options!r}"
        )
    pairs = list(options)
    for o in pairs:
        if not (isinstance(o, (tuple, list)) and len(o) == 2 and isinstance(o[0], (str, bytes))):
            raise ValueError(f"options: must be (name, value) pairs, got {o!r} among them")
    return [tuple(o) for o in pairs]


class _Base:
    """What the sync and async clients share: target, credentials, metadata, and calls made
    after close() (`stub`)."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: bool = False,
        root_certificates=None,
        client_cert=None,
        client_key=None,
        timeout: float | None = None,
        options: Sequence[tuple[str, object]] | None = (),
        keepalive: float = 300.0,
        keepalive_timeout: float = 20.0,
    ):
        self.target = _target(target)
        self.timeout = _timeout(timeout)
        self.metadata = (
            () if token in (None, "") else (("authorization", f"Bearer {_token(token)}"),)
        )
        self.credentials = channel_credentials(tls, root_certificates, client_cert, client_key)
        # grpc takes the first of repeated channel args: the caller's go before the defaults
        self.options = [
            *_options(options),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            *_keepalive(keepalive, keepalive_timeout),
        ]
        self.closed = False  # close() was called: every call then raises CANCELLED (`stub`)
        self._stub = None

    @property
    def stub(self) -> pb_grpc.StreamingInferenceStub:
        """The generated stub every call goes through; once close() was called, CANCELLED
        "the client was closed", the same for every call (grpc raised ValueError or
        UsageError about its channel)."""
        if self.closed:
            raise _cancelled(CLIENT_CLOSED)
        return self._open()

    @stub.setter
    def stub(self, stub) -> None:  # a stand-in for the server's (tests)
        self._stub = stub

    def _open(self) -> pb_grpc.StreamingInferenceStub:
        return self._stub

    def _kw(self, session_id: str = "", timeout: float | None = None) -> dict:
        t = self.timeout if timeout is None else _timeout(timeout)
        return {"metadata": self._md(session_id), "timeout": t}

    def _md(self, session_id: str = "") -> tuple:
        """Call metadata: auth, plus `x-session-id` for the sticky proxy."""
        return (*self.metadata, ("x-session-id", session_id)) if session_id else self.metadata


# FAILED_PRECONDITION is also the code of permanent refusals (a snapshot of another model,
# Generate on a values model): only these (the server's SessionBusy) pass once retried
_BUSY = ("held by replica", "attached to an open", "in flight")


def resumable_error(e: grpc.RpcError) -> bool:
    """True for the errors after which a session may be resumed (docs/scaleout.md): its
    replica is gone or draining (UNAVAILABLE), another replica still holds its lease
    (FAILED_PRECONDITION "held by replica"; the session's last Stream is still attached
    there, or a step of it is in flight; not the permanent ones, such as "another model": a
    replica serving another model, as in a rolling update, refuses it every time), or a
    proxy reset the Stream whose
    replica died (INTERNAL "RST_STREAM"; grpc.aio then fails the next write with "Internal
    error from Core"). Resume by reading the session's position (`snapshot()`) and sending
    from there."""
    details, code = e.details() or "", e.code()
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return any(words in details for words in _BUSY)
    return code == grpc.StatusCode.UNAVAILABLE or (
        code == grpc.StatusCode.INTERNAL and ("RST_STREAM" in details or "from Core" in details)
    )


def choose_session_id(session_id: str = "", field: str = "session_id") -> str:
    """The given id, or a fresh uuid4 (chosen client-side: see the module docstring)."""
    return _session_id(field, session_id) or str(uuid.uuid4())


# --- sync ---------------------------------------------------------------------------------


class Client(_Base):
    """Blocking client (see the module docstring). Use as a context manager or close().

    Args:
        target: "host:port" (or any gRPC target).
        token: bearer token (None or "": none); tls: TLS with the system roots.
        root_certificates, client_cert, client_key: PEM file paths or bytes (any implies
            TLS; the last two for mTLS, both or neither).
        timeout: seconds for each unary call (None: no limit; `rewind` takes its own, and
            `generate` one for the whole generation).
        options: grpc channel options, (name, value) pairs (None: none).
        keepalive: seconds between pings while calls are open (0: none, else >= 1); a server
            that does not answer one within `keepalive_timeout` seconds (stopped, or gone
            without closing the connection) ends them with UNAVAILABLE, as an open Stream
            would otherwise wait for it forever. The default, 5 minutes, is what any gRPC
            server takes; `ssmstream serve` takes pings as often as every second.
    """

    def __init__(self, target: str, token: str | None = None, tls: bool = False, **kw):
        super().__init__(target, token, tls, **kw)
        if self.credentials is None:
            self.channel = grpc.insecure_channel(target, options=self.options)
        else:
            self.channel = grpc.secure_channel(target, self.credentials, options=self.options)
        self._stub = pb_grpc.StreamingInferenceStub(self.channel)
        self._handles: weakref.WeakSet[StreamHandle] = weakref.WeakSet()  # closed with it
        self._handles_lock = threading.Lock()  # handles are opened from any thread

    def _call(self, rpc, *args, **kw):
        """`rpc(*args, **kw)`, a unary call's response or a streaming call (see _closed_sync)."""
        try:
            return rpc(*args, **kw)
        except (grpc.RpcError, ValueError) as e:
            _closed_sync(self, e)
            raise

    def _unary(self, rpc, request, session_id: str = "", timeout: float | None = None):
        return self._call(rpc, request, **self._kw(session_id, timeout))

    def info(self) -> pb.ModelInfo:
        """The served model and the server's limits (GetModelInfo): input_kind ("tokens" or
        "values"), vocab_size, d_input, d_output, step_sha256 (the model's identity, which
        snapshots are bound to), and `limits` (max_tokens_per_request, max_new_tokens,
        rewind_window, session_ttl_seconds, ...): the ranges requests must keep to."""
        return self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest())

    def create_session(
        self,
        session_id: str = "",
        ttl: float = 0.0,
        snapshot: BytesLike = b"",
        prompt: Sequence[int] | np.ndarray = (),
    ) -> ClientSession:
        """A new session; with `prompt`, after it (its longest cached prefix comes from the
        server's prefix cache: `cached_tokens` of the returned handle says how many)."""
        session_id = choose_session_id(session_id)
        req = create_request(session_id, ttl, snapshot, prompt)
        s = self._unary(self.stub.CreateSession, req, session_id)
        session = ClientSession(self, s.session_id, s.position, s.cached_tokens)
        if _prompt_ignored(req, s):
            with contextlib.suppress(grpc.RpcError):
                session.close()
            raise RuntimeError(PROMPT_IGNORED)
        return session

    def session(self, session_id: str, position: int = 0) -> ClientSession:
        """A handle on an existing session (no RPC); `position`: where it is, as far as the
        caller knows (each call's answer sets it)."""
        sid = _session_id("session_id", session_id)
        return ClientSession(self, sid, _count("position", position, 2**64 - 1))

    def restore(self, snapshot: BytesLike, session_id: str = "", ttl: float = 0.0) -> ClientSession:
        """A new session from `snapshot()` bytes, at the snapshot's state and position (the
        original goes on unchanged). The server accepts snapshots signed with its key
        (--snapshot-key, or --state-dir's) of the model it serves: others are refused,
        INVALID_ARGUMENT or FAILED_PRECONDITION saying which check failed. session_id: ""
        picks a new id; ttl: idle seconds (0: the server's default)."""
        session_id = choose_session_id(session_id)
        req = pb.RestoreRequest(
            snapshot=_bytes("snapshot", snapshot),
            session_id=session_id,
            ttl_seconds=_ttl(ttl),
        )
        s = self._unary(self.stub.RestoreSession, req, session_id)
        return ClientSession(self, s.session_id, s.position)

    def generate(
        self, prompt: Sequence[int] | np.ndarray, **kw
    ) -> Generator[pb.GenerateResponse, None, None]:
        """Generate on a temporary session (closed at the end); see ClientSession.generate."""
        return ClientSession(self, "", 0).generate(prompt, **kw)

    def close(self) -> None:
        """Close the channel, and the stream handles left open (their request threads end;
        a send raises CANCELLED "the stream's client was closed"). A call in flight, or made
        later, raises CANCELLED "the client was closed"; closing again does nothing."""
        self.closed = True
        with self._handles_lock:
            handles = list(self._handles)
        for h in handles:
            h._end("the stream's client was closed")
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_inputs(inputs, asynchronous: bool = False) -> None:
    """A Stream's `inputs`: an iterable (or, for the asyncio client, an async iterable), else
    ValueError naming it (grpc failed the call with UNKNOWN "Exception iterating requests!",
    and grpc.aio cancelled it: a CancelledError that nothing had asked for)."""
    if isinstance(inputs, Iterable) or (asynchronous and isinstance(inputs, AsyncIterable)):
        return
    what = "an iterable or an async iterable" if asynchronous else "an iterable"
    also = "; an async iterable needs AsyncClient" if isinstance(inputs, AsyncIterable) else ""
    raise ValueError(
        f"inputs: must be {what} of inputs (one request each), got {type(inputs).__name__}{also}"
    )


class _Requests:
    """A Stream's requests, one per input, for a client session (sync or async); an input
    the client refuses ends them (the stream half-closes after the earlier ones) and its
    ValueError is raised once their results are in (`raise_refused`)."""

    def __init__(self, session, kind: str, output: str, top_k: int):
        if kind not in ("tokens", "values"):
            raise ValueError(f"kind: must be 'tokens' or 'values', got {kind!r}")
        self.session, self.kind, self.output, self.top_k = session, kind, output, top_k
        self.refused: Exception | None = None  # also the caller's iterable's own error
        self.sent = self.answered = 0
        self.mark = session._asked()

    def _make(self, x) -> pb.StepRequest | None:
        try:
            req = step_request(self.session.id, **{self.kind: x}, output=self.output,
                               top_k=self.top_k)  # fmt: skip
        except ValueError as e:
            self.refused = e
            return None
        self.sent += 1
        return req

    def of(self, inputs: Iterable) -> Iterator[pb.StepRequest]:
        items = iter(inputs)
        while True:
            try:
                x = next(items)
            except StopIteration:
                return
            except Exception as e:  # raised to the caller, not lost in grpc's request thread
                self.refused = e
                return
            if (req := self._make(x)) is None:
                return
            yield req

    async def of_async(self, inputs) -> AsyncIterator[pb.StepRequest]:
        items = aiter(inputs)
        while True:
            try:
                x = await anext(items)
            except StopAsyncIteration:
                return
            except Exception as e:
                self.refused = e
                return
            if (req := self._make(x)) is None:
                return
            yield req

    def result(self, resp: pb.StepResponse) -> StepResult:
        """A response's result; the session learns its id (a Stream that created it) and
        position."""
        self.answered += 1
        r = StepResult.from_proto(resp)
        if not self.session.id:
            self.session.id = r.session_id
        self.mark = self.session._answered(self.mark, r.position)
        return r

    def raise_refused(self, cause: BaseException | None = None) -> None:
        """The refused item's ValueError (or the error of the caller's iterable), once every
        request sent before it was answered
        (a server error for one of those, `cause`, is that request's: raised by the caller)."""
        if self.refused is not None and self.answered == self.sent:
            raise self.refused from cause


class _Handle:
    """What the sync and async session handles share: the session's id, and its position as
    the server's answers to this handle's calls tell it (`_answered`)."""

    def __init__(self, client, session_id: str, position: int = 0, cached_tokens: int = 0):
        self.client, self.id, self.position = client, session_id, position
        self.cached_tokens = cached_tokens  # prompt inputs the prefix cache served at creation
        self._answers = 0  # answers taken so far
        self._lock = threading.Lock()  # threads' calls on one handle answer at once

    def _asked(self) -> int:
        """Before a request: the mark its answer is taken with."""
        return self._answers

    def _answered(self, mark: int, position: int) -> int:
        """Take the position the server answered to a request made at `mark`; returns the
        mark of the next request of the same call (a stream's). An answer no other answer
        came before (since its request) is the session's position, also where it is behind
        this handle's (a rewind; another client's too). One that others' overlapped is taken
        only if it is further: the server answers a session's requests in turn and, but for
        a rewind, never with a position before an earlier answer's, so a smaller one is an
        earlier answer arriving late (a thread's step answered before another's, whose answer
        it then overwrote). A rewind racing another call of the same handle is the caller's
        race: which of them the server took last, the answers do not tell."""
        with self._lock:
            if mark == self._answers or position > self.position:
                self.position = position
            self._answers += 1
            return self._answers


class ClientSession(_Handle):
    """A session on the server; `position` follows the responses this handle saw (several
    threads' calls on it included: see _Handle._answered)."""

    client: Client

    def __repr__(self) -> str:
        return f"ClientSession(id={self.id!r}, position={self.position})"

    def rewind(self, position: int, timeout: float | None = None) -> int:
        """Return the session to an earlier position within the server's rewind window;
        returns it (OUT_OF_RANGE outside the window). timeout: this call's, in seconds
        (default: the client's)."""
        req = pb.RewindRequest(session_id=self.id, position=_count("position", position, 2**64 - 1))
        mark = self._asked()
        s = self.client._unary(self.client.stub.RewindSession, req, self.id, timeout)
        self._answered(mark, s.position)
        return s.position

    def regenerate(
        self, position: int, prompt: Sequence[int] | np.ndarray, timeout: float | None = None, **kw
    ) -> Generator[pb.GenerateResponse, None, None]:
        """Rewind to `position`, then generate after `prompt` (pass another seed for another
        continuation): the one call behind "regenerate this answer". The arguments are
        checked here (against the model's `info()`), so a refused call changes nothing; the
        rewind runs when iteration starts, as the Generate does. `timeout`: the
        generation's, as `generate`'s."""
        _count("position", position, 2**64 - 1)
        _timeout(timeout)
        check_generate(generate_request(self.id, prompt, **kw), self.client.info())
        return self._regenerate(position, prompt, {**kw, "timeout": timeout})

    def _regenerate(
        self, position: int, prompt, kw: dict
    ) -> Generator[pb.GenerateResponse, None, None]:
        self.rewind(position)
        yield from self.generate(prompt, **kw)

    def step(self, tokens=None, values=None, output: str = "last", top_k: int = 0) -> StepResult:
        """Feed T inputs (unary Step); returns the selected outputs."""
        req = step_request(self.id, tokens, values, output, top_k)
        mark = self._asked()
        r = StepResult.from_proto(self.client._unary(self.client.stub.Step, req, self.id))
        self._answered(mark, r.position)
        return r

    def stream(
        self, inputs: Iterable, output: str = "last", top_k: int = 0, kind: str = "tokens"
    ) -> Generator[StepResult, None, None]:
        """One Stream request per item of `inputs` (token lists, or value arrays with
        kind="values"); yields one StepResult per item, in order. An item the client refuses
        ends the requests there: its ValueError is raised after the earlier items' results.
        Closing the iterator early cancels the call."""
        _check_inputs(inputs)
        reqs = _Requests(self, kind, output, top_k)
        call = self.client._call(
            self.client.stub.Stream, reqs.of(inputs), metadata=self.client._md(self.id)
        )
        try:
            for resp in call:
                yield reqs.result(resp)
        except grpc.RpcError as e:
            reqs.raise_refused(e)
            _closed_sync(self.client, e)
            raise
        finally:  # left early (close, Ctrl-C): no more inputs are sent, even while a
            call.cancel()  # traceback (the REPL's last one) still holds the call
        reqs.raise_refused()

    def open_stream(self) -> StreamHandle:
        """An interactive Stream: `send(tokens=...)` returns that request's result."""
        return StreamHandle(self)

    def generate(
        self, prompt: Sequence[int] | np.ndarray, timeout: float | None = None, **kw
    ) -> Generator[pb.GenerateResponse, None, None]:
        """Server-side sampling; yields one GenerateResponse per token as it arrives.
        `kw` are generate_request's (max_new_tokens, temperature, top_k, top_p, seed, stop,
        keep_session). Closing the iterator early cancels the call. `timeout`: seconds the
        whole generation may take (None: no limit; the Client's `timeout` is each unary
        call's): past it the iterator raises DEADLINE_EXCEEDED, and the server has stopped
        the generation as for a cancel."""
        req = generate_request(self.id, prompt, **kw)
        md, deadline = self.client._md(self.id), _timeout(timeout)
        mark = self._asked()
        call = self.client._call(self.client.stub.Generate, req, metadata=md, timeout=deadline)
        try:
            for r in call:
                if not self.id:
                    self.id = r.session_id
                mark = self._answered(mark, r.position)
                yield r
        except grpc.RpcError as e:
            _closed_sync(self.client, e)
            raise
        finally:
            call.cancel()

    def snapshot(self) -> bytes:
        """The session's state and position as signed bytes, for `Client.restore` (here or
        on a server with the same key and model); the handle's `position` becomes the
        server's (a way to read it after a cancelled call)."""
        mark = self._asked()
        req = pb.SnapshotRequest(session_id=self.id)
        snap = self.client._unary(self.client.stub.SnapshotSession, req, self.id)
        self._answered(mark, snap.position)
        return snap.data

    def fork(self, new_session_id: str = "") -> ClientSession:
        """A new session with a copy of this one's state and position (no bytes leave the
        server); the two then go on independently. new_session_id: "" picks one."""
        req = pb.ForkRequest(
            session_id=self.id, new_session_id=choose_session_id(new_session_id, "new_session_id")
        )
        s = self.client._unary(self.client.stub.ForkSession, req, self.id)
        return ClientSession(self.client, s.session_id, s.position)

    def close(self) -> int:
        """Free the session on the server; returns its final position."""
        mark = self._asked()
        req = pb.CloseSessionRequest(session_id=self.id)
        s = self.client._unary(self.client.stub.CloseSession, req, self.id)
        self._answered(mark, s.position)
        return s.position


CLIENT_CLOSED = "the client was closed"
STREAM_CLOSE_WAIT = 1.0  # seconds a stream's close waits for the server to end the call


def _closed_sync(client: Client, e: Exception) -> None:
    """In an `except` around a sync call: where the client's close() ended the call (grpc:
    CANCELLED "Channel closed!") or came as it began (grpc: ValueError "Cannot invoke RPC on
    closed channel!", a close in another thread after the call took the stub), raise
    CANCELLED "the client was closed", as a call made after close() and AsyncClient's do."""
    if client.closed and (
        isinstance(e, ValueError)
        or (isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.CANCELLED)
    ):
        raise _cancelled(CLIENT_CLOSED) from None


def _cancelled(details: str) -> grpc.aio.AioRpcError:
    """CANCELLED with `details`: what a stream handle's send raises once the handle ended."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )


class StreamHandle:
    """A bidi Stream fed from a queue: each `send` writes one request and waits for its
    response. `close()` (or leaving the `with` block) ends the stream; the session stays."""

    _END = object()

    def __init__(self, session: ClientSession):
        self.session = session
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._ended: str | None = None  # why sends are refused: closed, or interrupted
        client = session.client
        self._call = client._call(
            client.stub.Stream, iter(self._q.get, self._END), metadata=client._md(session.id)
        )
        with session.client._handles_lock:
            session.client._handles.add(self)

    def send(self, tokens=None, values=None, output: str = "last", top_k: int = 0) -> StepResult:
        """Write one request on the stream and wait for its response (arguments as
        ClientSession.step's). A server error ends the stream: that send raises it as a
        grpc.RpcError, and so does every later send (the refused request changed nothing:
        open another stream to go on)."""
        with self._lock:  # the session's id and position follow the responses in order
            if self._ended:  # said as the async handle says it, not grpc's "Locally cancelled"
                raise _cancelled(self._ended)
            req = step_request(self.session.id, tokens, values, output, top_k)
            mark = self.session._asked()
            self._q.put(req)
            try:
                r = StepResult.from_proto(next(self._call))
            except grpc.RpcError:
                if self._ended:  # closed while it waited (another thread): said as above
                    raise _cancelled(self._ended) from None
                raise
            except BaseException:  # interrupted while it waited (Ctrl-C): the response still
                self._end("this stream was cancelled by an earlier send's interruption")
                raise  # due would answer the next send; later sends raise CANCELLED
            if not self.session.id:
                self.session.id = r.session_id
            self.session._answered(mark, r.position)
        return r

    def close(self) -> None:
        """End the stream; a send in flight or later raises CANCELLED "this stream was
        closed". With no send in flight the requests end (a half-close) and this waits for
        the server to end the call (STREAM_CLOSE_WAIT at most): the session is let go of
        when it returns, and the call ends OK, not CANCELLED."""
        if not (self._ended or self._lock.locked()):  # (a send taking the lock now: refused)
            self._ended = "this stream was closed"
            self._q.put(self._END)
            done = threading.Event()
            self._call.add_done_callback(lambda _: done.set())
            done.wait(STREAM_CLOSE_WAIT)
        self._end("this stream was closed")

    def _end(self, why: str) -> None:
        self._ended = self._ended or why
        self._q.put(self._END)
        self._call.cancel()

    def __del__(self) -> None:  # dropped unclosed: end grpc's thread that reads the queue
        self._q.put(self._END)

    def __enter__(self) -> StreamHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- asyncio --------------------------------------------------------------------------------


class AsyncClient(_Base):
    """The asyncio client (grpc.aio); same methods as Client, awaited. It may be made outside
    the event loop that uses it (at import time, before `asyncio.run`): its channel opens on
    the first call, in that call's loop (see `_open`)."""

    def __init__(self, target: str, token: str | None = None, tls: bool = False, **kw):
        super().__init__(target, token, tls, **kw)
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the channel's (None: no loop ran)
        self._undoing: set[asyncio.Task] = set()  # closes of sessions cancelled calls made

    @property
    def channel(self) -> grpc.aio.Channel | None:
        """The running event loop's channel (opened here if not yet; None: never opened)."""
        if not self.closed:
            self._open()
        return self._channel

    def _open(self) -> pb_grpc.StreamingInferenceStub:
        """The stub of a channel of the running event loop: grpc.aio binds a channel to the loop
        it is made in (one made before `asyncio.run` failed every call "attached to a different
        loop"), so it is made on first use, and again in a later loop (another `asyncio.run`):
        the earlier loop's is dropped. RuntimeError where that loop still runs (one
        client used from two threads' loops at once): a client per loop, then."""
        loop = _running_loop()  # None: grpc.aio takes the thread's event loop
        if self._stub is not None and loop in (self._loop, None):
            return self._stub
        if self._loop is not None and self._loop.is_running():
            raise RuntimeError(
                "AsyncClient: its channel belongs to an event loop running in another thread; "
                "use one AsyncClient per event loop"
            )
        if self.credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self.options)
        else:
            self._channel = grpc.aio.secure_channel(
                self.target, self.credentials, options=self.options
            )
        self._stub = pb_grpc.StreamingInferenceStub(self._channel)
        self._loop = loop
        return self._stub

    @_Base.stub.setter
    def stub(self, stub) -> None:  # a stand-in for the server's (tests), in this loop
        self._stub, self._loop = stub, _running_loop()

    async def _unary(self, rpc, request, session_id: str = "", timeout: float | None = None):
        """`rpc(request)`'s response (grpc.aio raises asyncio.CancelledError for a call that
        close() ended: said as CANCELLED, see _closed_under)."""
        try:
            return await rpc(request, **self._kw(session_id, timeout))
        except asyncio.CancelledError:
            _closed_under(self)
            raise

    async def _make(self, rpc, request, session_id: str, made: str, chosen: bool):
        """`_unary` (about `session_id`) for a call that makes the session `made`. Cancelled
        (a timeout), the server may have made it and answered, the answer unread: where this
        client chose the id (the caller does not know it), the session is closed in the
        background (NOT_FOUND where it was not made), not left holding a slot until its TTL;
        that close is sent as about `session_id`, to the replica the call went to."""
        try:
            return await self._unary(rpc, request, session_id)
        except asyncio.CancelledError:
            if chosen:  # (close() may follow: the stub now)
                undo = self._undo(self._stub.CloseSession, made, session_id)
                task = asyncio.get_running_loop().create_task(undo)
                self._undoing.add(task)
                task.add_done_callback(self._undoing.discard)
            raise

    async def _undo(self, close, made: str, session_id: str) -> None:
        with contextlib.suppress(grpc.RpcError):
            await close(pb.CloseSessionRequest(session_id=made), **self._kw(session_id))

    async def info(self) -> pb.ModelInfo:
        """As Client.info."""
        return await self._unary(self.stub.GetModelInfo, pb.GetModelInfoRequest())

    async def create_session(
        self,
        session_id: str = "",
        ttl: float = 0.0,
        snapshot: BytesLike = b"",
        prompt: Sequence[int] | np.ndarray = (),
    ) -> AsyncClientSession:
        """As Client.create_session."""
        chosen, session_id = not session_id, choose_session_id(session_id)
        req = create_request(session_id, ttl, snapshot, prompt)
        s = await self._make(self.stub.CreateSession, req, session_id, session_id, chosen)
        session = AsyncClientSession(self, s.session_id, s.position, s.cached_tokens)
        if _prompt_ignored(req, s):
            with contextlib.suppress(grpc.RpcError):
                await session.close()
            raise RuntimeError(PROMPT_IGNORED)
        return session

    def session(self, session_id: str, position: int = 0) -> AsyncClientSession:
        """As Client.session."""
        sid = _session_id("session_id", session_id)
        return AsyncClientSession(self, sid, _count("position", position, 2**64 - 1))

    async def restore(
        self, snapshot: BytesLike, session_id: str = "", ttl: float = 0.0
    ) -> AsyncClientSession:
        """As Client.restore."""
        chosen, session_id = not session_id, choose_session_id(session_id)
        req = pb.RestoreRequest(
            snapshot=_bytes("snapshot", snapshot),
            session_id=session_id,
            ttl_seconds=_ttl(ttl),
        )
        s = await self._make(self.stub.RestoreSession, req, session_id, session_id, chosen)
        return AsyncClientSession(self, s.session_id, s.position)

    def generate(
        self, prompt: Sequence[int] | np.ndarray, **kw
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """As Client.generate (a temporary session); an async iterator."""
        return AsyncClientSession(self, "", 0).generate(prompt, **kw)

    async def close(self) -> None:
        """Close the channel; a call in flight, or made later, raises CANCELLED "the client was
        closed" (a stream handle's send: "the stream's client was closed"); closing again
        does nothing. The closes of sessions that cancelled calls made are waited for
        (STREAM_CLOSE_WAIT at most)."""
        self.closed = True
        undoing = [t for t in self._undoing if t.get_loop() is _running_loop()]
        if undoing:
            await asyncio.wait(undoing, timeout=STREAM_CLOSE_WAIT)
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncClientSession(_Handle):
    """A session seen through an AsyncClient (`position`: as ClientSession's)."""

    client: AsyncClient

    def __repr__(self) -> str:
        return f"AsyncClientSession(id={self.id!r}, position={self.position})"

    async def rewind(self, position: int, timeout: float | None = None) -> int:
        """As ClientSession.rewind."""
        req = pb.RewindRequest(session_id=self.id, position=_count("position", position, 2**64 - 1))
        mark = self._asked()
        s = await self.client._unary(self.client.stub.RewindSession, req, self.id, timeout)
        self._answered(mark, s.position)
        return s.position

    async def step(
        self, tokens=None, values=None, output: str = "last", top_k: int = 0
    ) -> StepResult:
        """As ClientSession.step."""
        req = step_request(self.id, tokens, values, output, top_k)
        mark = self._asked()
        r = StepResult.from_proto(await self.client._unary(self.client.stub.Step, req, self.id))
        self._answered(mark, r.position)
        return r

    def regenerate(
        self, position: int, prompt: Sequence[int] | np.ndarray, timeout: float | None = None, **kw
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """As ClientSession.regenerate: rewind to `position`, then generate after `prompt`
        (the arguments' types checked here; the model's ranges, then the rewind, when
        iteration starts)."""
        req = generate_request(self.id, prompt, **kw)
        _count("position", position, 2**64 - 1)
        _timeout(timeout)
        return self._regenerate(position, prompt, {**kw, "timeout": timeout}, req)

    async def _regenerate(
        self, position: int, prompt, kw: dict, req: pb.GenerateRequest
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        check_generate(req, await self.client.info())
        await self.rewind(position)
        # closed with this one (aclose, a break): `async for` alone left the Generate open
        async with contextlib.aclosing(self.generate(prompt, **kw)) as generation:
            async for r in generation:
                yield r

    async def stream(
        self, inputs: Iterable, output: str = "last", top_k: int = 0, kind: str = "tokens"
    ) -> AsyncGenerator[StepResult, None]:
        """As ClientSession.stream: one Stream request per item of `inputs` (an iterable or
        an async iterable), one StepResult per item, in order."""
        _check_inputs(inputs, asynchronous=True)
        reqs = _Requests(self, kind, output, top_k)
        made = reqs.of_async(inputs) if hasattr(inputs, "__aiter__") else reqs.of(inputs)
        call = self.client.stub.Stream(made, metadata=self.client._md(self.id))
        try:
            async for resp in call:
                yield reqs.result(resp)
        except grpc.RpcError as e:
            reqs.raise_refused(e)
            raise
        except asyncio.CancelledError:
            _closed_under(self.client)
            raise
        finally:  # left early (break, aclose): no more inputs are sent
            call.cancel()
        reqs.raise_refused()

    def open_stream(self) -> AsyncStreamHandle:
        """As ClientSession.open_stream: `await send(tokens=...)` returns that request's
        result; use it as `async with` (or await its close())."""
        return AsyncStreamHandle(self)

    async def generate(
        self, prompt: Sequence[int] | np.ndarray, timeout: float | None = None, **kw
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """As ClientSession.generate (`timeout`: the whole generation's); an async iterator."""
        req = generate_request(self.id, prompt, **kw)
        md, deadline = self.client._md(self.id), _timeout(timeout)
        mark = self._asked()
        call = self.client.stub.Generate(req, metadata=md, timeout=deadline)
        try:
            async for r in call:
                if not self.id:
                    self.id = r.session_id
                mark = self._answered(mark, r.position)
                yield r
        except asyncio.CancelledError:
            _closed_under(self.client)
            raise
        finally:
            call.cancel()

    async def snapshot(self) -> bytes:
        """As ClientSession.snapshot."""
        req = pb.SnapshotRequest(session_id=self.id)
        mark = self._asked()
        snap = await self.client._unary(self.client.stub.SnapshotSession, req, self.id)
        self._answered(mark, snap.position)
        return snap.data

    async def fork(self, new_session_id: str = "") -> AsyncClientSession:
        """As ClientSession.fork."""
        new_id = choose_session_id(new_session_id, "new_session_id")
        req = pb.ForkRequest(session_id=self.id, new_session_id=new_id)
        fork = self.client.stub.ForkSession
        s = await self.client._make(fork, req, self.id, new_id, not new_session_id)
        return AsyncClientSession(self.client, s.session_id, s.position)

    async def close(self) -> int:
        """As ClientSession.close."""
        req = pb.CloseSessionRequest(session_id=self.id)
        mark = self._asked()
        s = await self.client._unary(self.client.stub.CloseSession, req, self.id)
        self._answered(mark, s.position)
        return s.position


class AsyncStreamHandle:
    """An open bidi Stream: `await send(tokens=...)` writes one request, reads its response
    (concurrent sends from several tasks take turns, as StreamHandle's threads do)."""

    def __init__(self, session: AsyncClientSession):
        self.session = session
        self._call = session.client.stub.Stream(metadata=session.client._md(session.id))
        self._turn = asyncio.Lock()  # one write and its read at a time
        self._closed = False
        self._loop = _running_loop()  # the call's, where __del__ cancels it (None: no loop)

    async def send(
        self, tokens=None, values=None, output: str = "last", top_k: int = 0
    ) -> StepResult:
        """As StreamHandle.send."""
        async with self._turn:
            if self._closed or self.session.client.closed:  # grpc.aio would raise
                raise self._closed_error()  # CancelledError, as if the task was
            if self._call.done():  # ended by an earlier request's error: raise that status
                if self._call.cancelled():  # an earlier send was cancelled (a timeout)
                    raise _cancelled("this stream was cancelled by an earlier send's cancellation")
                await self._call.read()
            # made at its turn, as the sync handle makes it: a closed stream is said first,
            # and the id is the one the earlier sends' answers gave a new session
            req = step_request(self.session.id, tokens, values, output, top_k)
            mark = self.session._asked()
            try:
                await self._call.write(req)
                resp = await self._call.read()  # raises the stream's error status
            except asyncio.CancelledError:
                if not (self._closed or self.session.client.closed) or _cancelling():
                    raise  # this task was cancelled
                raise self._closed_error() from None  # a close() cancelled the call under it
        if resp is grpc.aio.EOF:
            raise grpc.aio.UsageError("stream ended without a response")
        r = StepResult.from_proto(resp)
        if not self.session.id:
            self.session.id = r.session_id
        self.session._answered(mark, r.position)
        return r

    def _closed_error(self) -> grpc.aio.AioRpcError:
        what = "this stream" if self._closed else "the stream's client"
        return _cancelled(f"{what} was closed")

    async def close(self) -> None:
        """End the stream; a send in flight raises CANCELLED "this stream was closed". With
        no send in flight this waits for the server to end the call after the requests end
        (STREAM_CLOSE_WAIT at most), as StreamHandle.close does."""
        idle, self._closed = not self._turn.locked(), True
        try:
            # a call ending under it (a send's task cancelled just before) refuses the
            # half-close with grpc's ExecuteBatchError: the call ends all the same (below)
            with contextlib.suppress(Exception):
                await self._call.done_writing()
            if idle:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._call.code(), STREAM_CLOSE_WAIT)
        finally:  # this close cancelled too (a timeout): the call ends all the same
            self._call.cancel()

    def __del__(self) -> None:
        """Dropped unclosed: cancel the call, which grpc.aio keeps (and the server its Stream,
        the session attached to it) until the channel closes. On the call's loop, whichever
        thread drops the handle; nothing once that loop is closed."""
        with contextlib.suppress(AttributeError, RuntimeError):  # half-built; loop closed
            if self._closed:
                return
            if self._loop is None:
                self._call.cancel()
            else:
                self._loop.call_soon_threadsafe(self._call.cancel)

    async def __aenter__(self) -> AsyncStreamHandle:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _closed_under(client: AsyncClient) -> None:
    """In an `except asyncio.CancelledError`: where the client's close() ended the call (and
    the task itself is not being cancelled), raise CANCELLED "the client was closed", as the
    sync client raises an RpcError (not CancelledError: a task cancelled though nothing
    cancelled it, which ends the caller's gather or TaskGroup as if it was cancelled). Before
    Python 3.11 a task does not tell it is being cancelled: one cancelled as its client closes
    raises CANCELLED too."""
    if client.closed and not _cancelling():
        raise _cancelled(CLIENT_CLOSED) from None


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # called outside a running loop
        return None


def _cancelling() -> bool:
    """Whether the current task is being cancelled (Python 3.11+ tells; before it, not known:
    False, so a close() under a send is said as such)."""
    task = asyncio.current_task()
    return task is not None and getattr(task, "cancelling", lambda: 0)() > 0
