"""Embed an exported model in-process (edge): onnxruntime + numpy, no server, no torch.

    ssmstream export ckpt/ --out model/
    python examples/edge_embed.py model/ "The state space model"

The whole API an edge device needs:

    from ssmstream.runtime import Engine
    eng = Engine("model/")                       # CUDA when usable, else CPU
    s = eng.new_state()                          # float32 [1, S]: the entire stream memory
    out, s = eng.step(np.array([tok]), s)        # one token -> logits [1, V], next state
    out, s = eng.prefill(np.array([prompt]), s)  # many tokens at once (chunked prefill graph)
    for tok in eng.generate(prompt, state=s, max_new_tokens=64, temperature=0.8, seed=0): ...

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
import sys
import time

import numpy as np
from ssmstream.runtime import Engine

log = logging.getLogger("edge_embed")


def run_tokens(eng: Engine, text: str, max_new_tokens: int, temperature: float, seed: int) -> None:
    prompt = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)  # [T] bytes
    if eng.vocab_size < 256:
        prompt %= eng.vocab_size  # a toy vocabulary: still runs, output is not text
    # 1. token by token: the recurrence, O(1) per token
    s = eng.new_state()
    t0 = time.perf_counter()
    for tok in prompt:
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
    # 3. generation continues this stream; `s` is updated in place to include every token
    state = s[0].copy()  # [S]
    out = bytearray()
    for tok in eng.generate(
        [int(prompt[-1])], state=state, max_new_tokens=max_new_tokens,
        temperature=temperature, seed=seed,
    ):  # fmt: skip
        out.append(tok % 256)
    log.info("continuation: %r", out.decode("utf-8", errors="replace"))
    log.info("the stream's whole memory: %d bytes of state", state.nbytes)


def run_values(eng: Engine, steps: int) -> None:
    d = eng.d_input
    t = np.arange(steps, dtype=np.float32)[:, None]  # [T, 1]
    u = np.sin(2 * math.pi * t / 50.0 + np.arange(d, dtype=np.float32)).astype(np.float32)
    s = eng.new_state()
    for k in range(steps):
        y, s = eng.step(u[k : k + 1], s)  # [1, d_input] -> [1, d_output]
        if k % max(1, steps // 8) == 0:
            log.info("t=%4d  input %s  output %s", k, np.round(u[k], 3), np.round(y[0], 3))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model_dir", help="an exported model directory (ssmstream export)")
    p.add_argument("text", nargs="?", default="The state space model ", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=80, help="tokens to generate")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ssmstream.runtime.errors import RuntimeErrorBase

    try:
        eng = Engine(a.model_dir, device=a.device, threads=a.threads)
        log.info(
            "%s: %s model, S=%d, on %s", eng.name, eng.input_kind, eng.state_size, eng.provider
        )
        if eng.input_kind == "tokens":
            run_tokens(eng, a.text, a.max_new_tokens, a.temperature, a.seed)
        else:
            run_values(eng, 200)
    except RuntimeErrorBase as e:
        log.error("error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
