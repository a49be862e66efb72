"""Fault injection at the onnxruntime call itself, for any test that holds an Engine:
`inject(engine, fail=1)` makes the next served step raise as onnxruntime does on a kernel
failure. (tests/ is on sys.path through tests/conftest.py: `from faults import inject`.)"""

from __future__ import annotations

import contextlib
import time


class SlowOrFailingSession:
    """Wraps an onnxruntime InferenceSession to inject faults at the ORT call itself.

    Per run n (0-based): run 0 first waits for `gate` (a threading.Event, when given: it
    holds the engine's worker so that requests queue up behind it); runs n >= delay_from
    sleep `delay` seconds; runs n >= after raise, `fail` times in all (as onnxruntime does on
    a kernel failure). calls: one entry per run (the batch size for `run`, -1 for
    `run_with_iobinding`, whose batch is in the binding).
    """

    def __init__(self, sess, delay=0.0, fail=0, after=0, delay_from=0, gate=None):
        self.sess, self.delay, self.fail, self.after = sess, delay, fail, after
        self.delay_from, self.gate, self.calls = delay_from, gate, []

    def _fault(self, batch: int) -> None:
        n = len(self.calls)
        self.calls.append(batch)
        if n == 0 and self.gate is not None:
            self.gate.wait(30)
        if self.delay and n >= self.delay_from:
            time.sleep(self.delay)
        if self.fail > 0 and n >= self.after:
            self.fail -= 1
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : injected kernel failure")

    def run(self, names, feeds, *args, **kw):
        self._fault(int(feeds["input"].shape[0]))
        return self.sess.run(names, feeds, *args, **kw)

    def run_with_iobinding(self, io, *args, **kw):
        self._fault(-1)
        return self.sess.run_with_iobinding(io, *args, **kw)

    def __getattr__(self, name):
        return getattr(self.sess, name)


@contextlib.contextmanager
def inject(engine, graph: str = "slot", **faults):
    """Replace the engine's slot-step ORT session (the served steps; or "prefill", "step")
    by a SlowOrFailingSession(**faults)."""
    attr = f"_{graph}_session"
    real = getattr(engine, attr)
    fake = SlowOrFailingSession(real, **faults)
    setattr(engine, attr, fake)
    try:
        yield fake
    finally:
        setattr(engine, attr, real)
