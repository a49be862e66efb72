"""Embed an exported model in-process (edge): onnxruntime + numpy, no server, no torch.

    ssmstream export examples/checkpoints/byte-lm --out /tmp/ssm-model
    python examples/edge_embed.py /tmp/ssm-model "The state space model "

The whole API an edge device needs:

    import numpy as np
    from ssmstream.runtime import Engine
    eng = Engine("/tmp/ssm-model")                      # CUDA when usable, else CPU
    prompt = list(b"The state space model ")           # byte-level: token = byte
    s = eng.new_state()                                 # float32 [1, S]: the entire stream memory
    out, s = eng.step(np.array([prompt[0]]), s)         # one token -> logits [1, V], next state
    out, s = eng.prefill(np.array([prompt[1:-1]]), s)   # many tokens at once (chunked prefill)
    new = list(eng.generate(prompt[-1:], state=s, max_new_tokens=64, temperature=0.8, seed=0))

`generate(tokens, state=s)` feeds `tokens` first, then samples, and updates `s` in place, so
a stream is continued by passing the tokens it has not seen yet: above, `s` holds every
prompt byte but the last, and `new` equals a fresh `eng.generate(prompt, ...)` with the same
seed. (Passing a token the state already holds would feed it twice.)

A state is S float32 numbers whatever the stream length, so a device can keep thousands
of streams, save one to disk (`s.tobytes()`), or branch one (`s.copy()`). For a loop that
allocates nothing per step, alternate two `eng.step_buffers()` (see Engine.step's `out=`).

Token models are treated as byte-level (vocab >= 256: token = byte). A values model is fed
a sine wave instead and its predictions printed.

Dimension letters: S packed state size, V vocabulary, T prompt length.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

import numpy as np
from ssmstream.runtime import Engine
from ssmstream.runtime.cli import HelpFormatter

log = logging.getLogger("edge_embed")


def run_tokens(
    eng: Engine, text: str, max_new_tokens: int, temperature: float, seed: int
) -> list[int]:
    """Step `text` through the model, check prefill agrees, then continue the stream.

    Returns:
        the generated tokens: equal to a fresh `eng.generate(prompt, ...)` with the same
        arguments, since the stream is continued from its state before the last prompt byte.
    """
    prompt = np.frombuffer(os.fsencode(text), dtype=np.uint8).astype(np.int64)  # [T] bytes given
    if eng.vocab_size < 256:
        prompt %= eng.vocab_size  # a toy vocabulary: still runs, output is not text
    # 1. token by token: the recurrence, O(1) per token
    s = eng.new_state()  # [1, S]
    t0 = time.perf_counter()
    for tok in prompt:
        before = s  # the state before `tok`: step returns a new array
        logits, s = eng.step(np.array([tok]), s)  # [1, V], [1, S]
    per_token = (time.perf_counter() - t0) / len(prompt)
    # 2. the same prompt in one prefill call: the same state
    _, s_prefill = eng.prefill(prompt[None], eng.new_state())
    gap = float(np.abs(s_prefill - s).max())
    log.info(
        "%d prompt tokens stepped at %.0f µs/token; prefill reaches the same state (max |Δ| %.1e)",
        len(prompt), 1e6 * per_token, gap,
    )  # fmt: skip
    top = np.argsort(-logits[0])[:3]
    log.info("next-token guesses after the prompt: %s", [int(t) for t in top])
    # 3. continue the stream. generate() feeds the tokens it is given before it samples, so it
    # starts from the state before the last byte and is given that byte; `state` is updated
    # in place to include every token fed and generated.
    state = before[0].copy()  # [S]
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    new = [int(tok) for tok in eng.generate(prompt[-1:], state=state, **sampling)]
    text_out = bytes(t % 256 for t in new).decode("utf-8", errors="replace")
    log.info("continuation: %r", text_out)
    log.info("the stream's whole memory: %d bytes of state", state.nbytes)
    return new


def run_values(eng: Engine, steps: int) -> None:
    d = eng.d_input
    t = np.arange(steps, dtype=np.float32)[:, None]  # [T, 1]
    u = np.sin(2 * math.pi * t / 50.0 + np.arange(d, dtype=np.float32)).astype(np.float32)
    s = eng.new_state()
    for k in range(steps):
        y, s = eng.step(u[k : k + 1], s)  # [1, d_input] -> [1, d_output]
        if k % max(1, steps // 8) == 0:
            log.info("t=%4d  input %s  output %s", k, np.round(u[k], 3), np.round(y[0], 3))


class _Help(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The docstring as written above the options; each option's default in its help."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    p.add_argument("model_dir", help="an exported model directory (ssmstream export)")
    p.add_argument(
        "text",
        nargs="?",
        default="The state space model ",
        help="prompt text (default: %(default)r)",
    )
    p.add_argument("--max-new-tokens", type=int, default=80, help="tokens to generate")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="onnxruntime intra-op threads of the prefill graph (default: all cores; the "
        "step runs on the calling thread)",
    )
    a = p.parse_args(argv)
    if not a.text:
        p.error("text: give at least one character")
    if a.max_new_tokens < 0:
        p.error(f"--max-new-tokens: must be >= 0, got {a.max_new_tokens}")
    from ssmstream.runtime.cli import said_of_flags
    from ssmstream.runtime.config import with_flags
    from ssmstream.runtime.errors import InvalidInput, RuntimeErrorBase
    from ssmstream.runtime.sampling import SamplingConfig

    try:  # before the model loads and the prompt is stepped
        SamplingConfig(temperature=a.temperature, seed=a.seed)
    except InvalidInput as e:
        p.error(said_of_flags(str(e), {"temperature": "--temperature", "seed": "--seed"}))
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        eng = Engine(a.model_dir, device=a.device, threads=a.threads)
        log.info(
            "%s: %s model, S=%d, on %s", eng.name, eng.input_kind, eng.state_size, eng.provider
        )
        if eng.input_kind == "tokens":
            run_tokens(eng, a.text, a.max_new_tokens, a.temperature, a.seed)
        else:
            run_values(eng, 200)
    except RuntimeErrorBase as e:  # a model it cannot open, a flag's value (named)
        log.error("edge_embed.py: error: %s", with_flags(str(e)))
        return 2
    return 0


if __name__ == "__main__":
    from ssmstream.runtime.cli import run_command

    sys.exit(run_command(main, "edge_embed.py"))
