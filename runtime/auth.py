"""Bearer-token authentication: `authorization: Bearer <token>` metadata → principal.

A tokens file has one `<token> <principal>` pair per line (blank lines and lines starting
with `#` are ignored). The server keeps only sha256(token) and looks a caller's digest up
by value: how long that takes says nothing of how much of a token was right (a near miss's
digest shares no more with a token's than any other string's), and it does not grow with the
number of tokens. Tokens are never logged.

`AuthInterceptor` checks every RPC except the open ones (grpc.health.v1, so load
balancers can probe without a token) and hands the principal to the handler through a
context variable (`current_principal()`). Without a tokens file every caller is the
principal `anonymous`. A session belongs to the principal that created it. Refused calls
are logged at most once every REFUSALS_LOGGED_EVERY seconds (`RefusalLog`: a caller without
a token could otherwise write a log line per call); the metric counts each.
"""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from .secret_files import warn_unless_private

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
# health Check stays open for load balancers and probes; Watch (a stream that never ends
# by itself) needs a token: anonymous watches would take --max-concurrent-rpcs from clients
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/Check",)
REFUSALS_LOGGED_EVERY = 10.0  # seconds

_principal: contextvars.ContextVar[str] = contextvars.ContextVar(
    "ssmstream_principal", default=ANONYMOUS
)


def current_principal() -> str:
    """The principal of the RPC being handled (ANONYMOUS when auth is off)."""
    return _principal.get()


class TokenTable:
    """token → principal, stored as sha256 digests."""

    def __init__(self, tokens: dict[str, str]):
        if not tokens:
            raise ValueError("auth_tokens: the token table is empty")
        self._principals: dict[bytes, str] = {}
        for token, principal in tokens.items():
            if not token or not principal:
                raise ValueError("auth_tokens: tokens and principals must be non-empty")
            self._principals[_digest(token)] = principal

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TokenTable:
        """Read `<token> <principal>` lines; errors name the line, never the token."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"auth_tokens: {path} is not a file")
        tokens: dict[str, str] = {}
        try:
            data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # an editor's UTF-8 BOM
        except OSError as e:  # no permission to read it: said of the flag, as other files are
            raise ValueError(f"auth_tokens: cannot read {path}: {e.strerror or e}") from None
        for n, raw in enumerate(data.splitlines(), start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"auth_tokens: {path}:{n}: not valid UTF-8") from None
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"auth_tokens: {path}:{n}: expected '<token> <principal>'")
            token, principal = parts
            if not (token.isascii() and token.isprintable()):  # HTTP/2 metadata carries no other
                raise ValueError(
                    f"auth_tokens: {path}:{n}: the token must be visible ASCII (no client can "
                    "send another)"
                )
            if token in tokens:
                raise ValueError(f"auth_tokens: {path}:{n}: duplicate token")
            tokens[token] = principal
        if not tokens:
            raise ValueError(
                f"auth_tokens: {path} holds no '<token> <principal>' line (only blank lines "
                "and # comments)"
            )
        warn_unless_private(
            path, "bearer tokens file", "whoever reads it can call this server as its principals"
        )
        log.info("auth: %d tokens for %d principals", len(tokens), len(set(tokens.values())))
        return cls(tokens)

    def principal(self, token: str) -> str | None:
        """The principal of `token`, or None."""
        return self._principals.get(_digest(token))

    def principal_from_metadata(self, metadata) -> str | None:
        """The principal named by an `authorization: Bearer <token>` metadata entry."""
        for key, value in metadata or ():
            if key.lower() != "authorization":
                continue
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return self.principal(token.strip())
            return None
        return None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _wrap_behavior(behavior: Callable, principal: str) -> Callable:
    """The same RPC behavior, run with `current_principal()` == principal."""
    if inspect.isasyncgenfunction(behavior):

        async def gen(request, context):
            _principal.set(principal)
            async for response in behavior(request, context):
                yield response

        return gen

    async def call(request, context):
        _principal.set(principal)
        return await behavior(request, context)

    return call


def _with_principal(handler: grpc.RpcMethodHandler, principal: str) -> grpc.RpcMethodHandler:
    kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
    changes = {
        k: _wrap_behavior(getattr(handler, k), principal)
        for k in kinds
        if getattr(handler, k) is not None
    }
    return handler._replace(**changes)


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler that fails with UNAUTHENTICATED as the call starts, before any of its
    request is read. grpc reads a unary request whole (up to --max-message-bytes) before the
    behavior runs: an unknown caller that sent all of a large message but its last byte, on
    many calls at once, had the server hold that much per call for as long as it liked. So
    the refusal takes the requests as a stream it never reads (the caller sees no
    difference), and parses nothing."""

    async def abort(requests, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = dict.fromkeys(("unary_unary", "unary_stream", "stream_unary", "stream_stream"))
    kinds["stream_stream" if handler.response_streaming else "stream_unary"] = abort
    return handler._replace(request_streaming=True, request_deserializer=None, **kinds)


class RefusalLog:
    """Logs a refused call at once, then none for `every` seconds: those are counted and the
    next line logged says how many there were."""

    def __init__(self, every: float = REFUSALS_LOGGED_EVERY, clock=time.monotonic):
        self.every, self.clock = every, clock
        self.quiet_until = -float("inf")
        self.unlogged = 0  # refusals since the last line

    def refused(self, method: str, reason: str) -> None:
        now = self.clock()
        if now < self.quiet_until:
            self.unlogged += 1
            return
        more = f"; {self.unlogged} more since the previous line" if self.unlogged else ""
        log.info("auth: refused %s (%s)%s", method, reason, more)
        self.unlogged, self.quiet_until = 0, now + self.every


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Resolve the caller's principal for every RPC; refuse unknown callers.

    tokens=None: auth off, every caller is ANONYMOUS. on_denied(method) is called for
    each refused RPC (metrics).
    """

    def __init__(
        self,
        tokens: TokenTable | None,
        open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES,
        on_denied: Callable[[str], None] | None = None,
    ):
        self.tokens = tokens
        self.open_prefixes = open_prefixes
        self.on_denied = on_denied
        self.refusals = RefusalLog()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        method = handler_call_details.method
        if self.tokens is None:
            return handler  # current_principal() defaults to ANONYMOUS: nothing to wrap
        if method.startswith(self.open_prefixes):
            return handler
        principal = self.tokens.principal_from_metadata(handler_call_details.invocation_metadata)
        if principal is None:
            has_header = any(
                k.lower() == "authorization"
                for k, _ in handler_call_details.invocation_metadata or ()
            )
            reason = "invalid bearer token" if has_header else "missing bearer token"
            self.refusals.refused(method, reason)
            if self.on_denied is not None:
                self.on_denied(method)
            return _denied(  # said for any gRPC client, and for ours
                handler,
                f"{reason}: send metadata 'authorization: Bearer <token>' (ssmstream's Python "
                "clients: Client(token=...) or AsyncClient(token=...))",
            )
        return _with_principal(handler, principal)
