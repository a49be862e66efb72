"""Stream a text into a session on a running server, one byte per request, then let the
server continue it — the session's state carries the whole prefix at O(1) cost per step.

    ssmstream serve model/ --port 50051 &
    python examples/stream_client.py --server 127.0.0.1:50051 "def fibonacci(n):"

For each byte fed, prints the model's top-3 guesses for the next byte (from the log-probs
the server returns with output=top_k), then the server-side continuation. Works with any
byte-level token model (vocab >= 256); values models are fed a sine wave instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys

import grpc
from ssmstream.runtime.cli import HelpFormatter
from ssmstream.runtime.client import Client, check_generate, generate_request

log = logging.getLogger("stream_client")


def show(b: int) -> str:
    return repr(chr(b)) if 32 <= b < 127 else f"0x{b:02x}"


class _Help(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The docstring as written above the options; each option's default in its help."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    p.add_argument(
        "text", nargs="?", default="def fibonacci(n):\n", help="prompt text (default: %(default)r)"
    )
    p.add_argument("--server", default="127.0.0.1:50051", help="server host:port")
    p.add_argument("--max-new-tokens", type=int, default=120, help="continuation length")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tls-ca", default=None, help="PEM CA of a TLS server")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate (mTLS)")
    p.add_argument("--tls-key", default=None, help="PEM client key (mTLS)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    token = os.environ.get("SSMSTREAM_TOKEN", "").strip() or None  # if the server wants one
    try:
        client = Client(
            a.server,
            token=token,
            root_certificates=a.tls_ca,
            client_cert=a.tls_cert,
            client_key=a.tls_key,
        )
    except ValueError as e:  # a bad --server or TLS file, named
        p.error(str(e))
    try:
        return stream(p, a, client)
    except grpc.RpcError as e:  # the server is unreachable or went away: one line
        print(f"stream_client.py: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


def stream(p: argparse.ArgumentParser, a: argparse.Namespace, client: Client) -> int:
    with client:
        info = client.info()
        log.info(
            "model %r: %s, state %d floats (%d bytes per session), provider %s",
            info.name,
            info.input_kind,
            info.state_size,
            info.state_bytes,
            info.provider,
        )
        data = os.fsencode(a.text)  # the bytes given, also ones not UTF-8 (as `generate`)
        if info.input_kind == "tokens":  # every check before a session is made
            if len(data) < 2:
                p.error("text: give at least two bytes")
            for seed in (a.seed, a.seed + 1):  # the session's and the fork's
                kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=seed)
                try:
                    check_generate(generate_request("", data[-1:], **kw), info)
                except ValueError as e:  # "field: what" -> "--field: what" (prompt: the text)
                    field, what = str(e).split(": ", 1)
                    p.error(
                        f"{'text' if field == 'prompt' else '--' + field.replace('_', '-')}: {what}"
                    )
        sessions = [client.create_session()]
        try:
            return run(a, info, data, sessions)
        finally:  # also after an error: nothing is left open on the server
            for s in sessions:
                with contextlib.suppress(grpc.RpcError):  # the error that ended it goes on
                    s.close()


def run(a, info, data: bytes, sessions: list) -> int:
    session = sessions[0]
    if info.input_kind != "tokens":
        with session.open_stream() as stream:  # a sine wave, one sample per request
            for t in range(32):
                u = [math.sin(0.3 * t)] * info.d_input
                r = stream.send(values=u)
                y = ", ".join(f"{v:+.3f}" for v in r.outputs[0])
                log.info("t=%2d  u=%+.3f  y=[%s]", t, u[0], y)
        return 0
    with session.open_stream() as stream:  # all bytes but the last: Generate starts there
        for b in data[:-1]:
            r = stream.send(tokens=[b], output="top_k", top_k=3)
            guesses = ", ".join(
                f"{show(int(t))} {math.exp(lp):.2f}" for t, lp in zip(r.top_tokens, r.top_logprobs)
            )
            log.info("fed %-6s position %3d  next: %s", show(b), r.position, guesses)
    # the stream is closed, the session is not. Fork it: two continuations of one prefix.
    sessions.append(session.fork())
    for name, s, seed in zip(("session", "fork"), sessions, (a.seed, a.seed + 1)):
        out = bytearray()
        for g in s.generate(data[-1:], max_new_tokens=a.max_new_tokens,
                            temperature=a.temperature, seed=seed):  # fmt: skip
            if g.token < 256:  # a byte; larger ids (a vocabulary past bytes) are not text
                out.append(g.token)
        text = (data + out).decode("utf-8", errors="replace")  # the prompt's bytes too
        sys.stdout.write(f"--- {name} {s.id} (seed {seed}) ---\n{text}\n")
    return 0


if __name__ == "__main__":
    from ssmstream.runtime.cli import run_command

    sys.exit(run_command(main, "stream_client.py"))
