"""`ssmstream generate`: stream a generation from a running server, as text (or token ids),
through the Python client (runtime/client.py)."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import os
import signal
import sys
import threading
import time

import grpc

from .cli import HelpFormatter, said_of_flags, stdout_closed
from .client import Client, ClientSession, check_generate, generate_request
from .client_flags import add_connection_flags, connect, tls_hint
from .sampling import check_params


def _say_kept(a, session, printed: int, cut: bool = False) -> None:
    """After a generation on a session that stays (--keep-session, --session). The last token
    received is not fed: it starts the session's next prompt. A cut generation (Ctrl-C, a
    closed pipe, an error) may have fed tokens sampled after it that never arrived: a new
    kept session (its id is known only here) is rewound to the position of the last one
    received; for a --session, which other clients may use, and where the rewind fails,
    stderr says how to do it. A new kept session's id and position go to stderr."""
    if session is None or not session.id or not (a.keep_session or a.session):
        return
    if cut and printed:
        position = session.position
        why = "" if a.session else _rewind_after_cut(session, position)
        if why is not None:
            sys.stderr.write(
                f"ssmstream generate: the session may hold tokens sampled after the last one "
                f"received{why}; to drop them: --session {session.id} --rewind-to {position}\n"
            )
    if a.keep_session and not a.session:
        sys.stderr.write(f"session: {session.id} (position {session.position})\n")


def _rewind_after_cut(session: ClientSession, position: int, wait: float = 2.0) -> str | None:
    """Rewind to `position` within `wait` seconds: None, or why it was not (" (CODE:
    details)", " (interrupted)"). The server holds the rewind until the cancelled Generate
    has let go of the session."""
    try:
        session.rewind(position, timeout=wait)
        return None
    except grpc.RpcError as e:
        return f" ({e.code().name}: {e.details()})"
    except KeyboardInterrupt:  # a second Ctrl-C
        return " (interrupted)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssmstream generate",
        description=(
            "Stream a generation from a running `ssmstream serve`. The prompt is UTF-8 "
            "bytes for a byte-level model (vocab >= 256), or token ids with --ids; the "
            "continuation is printed as it arrives."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("prompt", help="prompt text (or comma-separated token ids with --ids)")
    add_connection_flags(p, 30.0, "seconds for each unary call (not the generation); inf: no limit")
    p.add_argument("--ids", action="store_true", help="prompt and output are token ids")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=_Default(200),
        help="tokens to generate (default: %(default)s, or the server's --max-new-tokens if lower)",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely; 0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 (or 0): off")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", default="", help="comma-separated stop token ids")
    p.add_argument("--session", default="", help="continue this session instead of a new one")
    p.add_argument(
        "--keep-session",
        action="store_true",
        help="keep the new session after the generation and print its id to stderr (for "
        "--session and --rewind-to later)",
    )
    p.add_argument(
        "--rewind-to",
        type=int,
        default=None,
        metavar="POSITION",
        help="with --session: first rewind it to this earlier position (regenerate: the same "
        "prompt with another --seed gives another continuation from there)",
    )
    p.add_argument(
        "--token-env",
        default="SSMSTREAM_TOKEN",
        help="environment variable holding the bearer token (tokens stay out of argv)",
    )
    p.add_argument(
        "--stats",
        action="store_true",
        help="print tokens, seconds, tokens/s and time to first token on stderr at the end",
    )
    return p


class _Default(int):
    """A flag's default value, told from the same number given on the command line."""


def _ids(text: str, flag: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated integers, got {text!r}")
        raise


# the request's sampling fields -> the `ssmstream generate` flags that give them
_SAMPLING_FLAGS = {
    "max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
    "top_p": "--top-p", "seed": "--seed", "stop": "--stop",
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    stop = _ids(a.stop, "--stop", parser)
    if a.rewind_to is not None and not a.session:  # before any call to the server
        parser.error("--rewind-to needs --session")
    if a.rewind_to is not None and a.rewind_to < 0:
        parser.error(f"--rewind-to: must be a position >= 0, got {a.rewind_to}")
    if a.max_new_tokens < 1:  # every server's lower bound: said before any call
        parser.error(f"--max-new-tokens: must be an integer >= 1, got {a.max_new_tokens}")
    try:  # the sampling flags, checked as the request will be, before any call
        generate_request("", [], a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed, stop)
        check_params(a.temperature, a.top_k, a.top_p or 1.0)  # the ranges that need no model
    except ValueError as e:
        parser.error(said_of_flags(str(e), _SAMPLING_FLAGS))
    token = os.environ.get(a.token_env, "").strip() or None  # blanks around: as the server
    client = connect(a, parser, token=token)
    stopped_by = [signal.SIGINT]
    with contextlib.ExitStack() as undo:
        if threading.current_thread() is threading.main_thread():  # signal.signal's own rule
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # a kill, a timeout
                old = signal.signal(signal.SIGTERM, _interrupt_by(stopped_by))  # as Ctrl-C
                undo.callback(signal.signal, signal.SIGTERM, old)
        return _generate(a, parser, client, stop, stopped_by)


def _interrupt_by(stopped_by: list):
    def handler(signum, frame):
        stopped_by[:] = [signal.Signals(signum)]
        raise KeyboardInterrupt

    return handler


def _generate(a, parser, client: Client, stop: list[int], stopped_by: list) -> int:
    out, session, n = sys.stdout, None, 0
    try:
        info = client.info()
        if info.input_kind != "tokens":
            parser.error("this model takes values: Generate needs a token model (use Step)")
        if a.ids:
            prompt = _ids(a.prompt, "prompt", parser)
        elif info.vocab_size < 256:
            parser.error("this model is not byte-level: pass token ids with --ids")
        else:
            prompt = list(os.fsencode(a.prompt))  # the bytes given, also ones not UTF-8
        if isinstance(a.max_new_tokens, _Default) and info.limits.max_new_tokens:
            # not asked for: as many as this server allows, up to the default
            a.max_new_tokens = min(a.max_new_tokens, info.limits.max_new_tokens)
        kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                  top_p=a.top_p, seed=a.seed, stop=stop, keep_session=a.keep_session)  # fmt: skip
        check_generate(generate_request(a.session, prompt, **kw), info)  # before the rewind
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        session = client.session(a.session)
        if a.rewind_to is not None:
            session.rewind(a.rewind_to)
        t0, first, n = time.perf_counter(), None, 0
        for r in session.generate(prompt, **kw):
            n += 1
            first = time.perf_counter() - t0 if first is None else first
            if a.ids:
                out.write(f"{r.token}\n")
            elif r.token < 256:
                out.write(decoder.decode(bytes([r.token])))
            out.flush()
        if not a.ids:
            out.write(decoder.decode(b"", final=True) + "\n")
            out.flush()
        _say_kept(a, session, n)
        if a.stats:
            dt = time.perf_counter() - t0
            sys.stderr.write(
                f"[{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s, "
                f"first token after {1000 * (first or 0):.1f} ms]\n"
            )
    except grpc.RpcError as e:
        details = e.details() or ""
        if a.rewind_to is not None and not n:  # the rewind's `position` is --rewind-to here
            details = said_of_flags(details, {"position": "--rewind-to"})
        sys.stderr.write(f"ssmstream generate: {e.code().name}: {details}\n")
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:  # where this command takes a token
            given = "is empty" if not os.environ.get(a.token_env, "").strip() else "is set"
            sys.stderr.write(
                f"ssmstream generate: the bearer token is read from ${a.token_env} (--token-env "
                f"names another variable), which {given}\n"
            )
        if hint := tls_hint(e, a):
            sys.stderr.write(f"ssmstream generate: {hint}\n")
        _say_kept(a, session, n, cut=True)  # a drain cut it: the kept session resumes later
        return 1
    except ValueError as e:  # the client's own argument checks name the argument, as its flag
        parser.error(said_of_flags(str(e), _SAMPLING_FLAGS))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM stops the generation; a kept session is
        # still named, on a line of its own: text tokens end mid-line (ids end with a newline)
        sig = stopped_by[0]
        said = "interrupted" if sig == signal.SIGINT else f"stopped by {sig.name}"
        sys.stderr.write(("\n" if n and not a.ids else "") + f"ssmstream generate: {said}\n")
        _say_kept(a, session, n, cut=True)
        return 128 + sig
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as cat does
        _say_kept(a, session, n, cut=True)  # on stderr: its id is not lost with stdout
        return stdout_closed()
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
