"""The signal task draws each sinusoid's frequency log-uniformly in [freq_min, freq_max]
(model/data.py): read back from the spectrum of one-component signals, the frequencies spread
evenly over log f, with median near the geometric mean √(freq_min · freq_max), where a
uniform draw would put it near the arithmetic mean."""

from __future__ import annotations

import math

import torch
from ssmstream.model.data import SignalConfig, signal_batch


def test_frequencies_are_log_uniform_in_the_range():
    lo, hi = 0.05, 1.0
    cfg = SignalConfig(rate=8.0, duration=200.0, n_components=1, freq_min=lo, freq_max=hi)
    u, _ = signal_batch(cfg, 400, torch.Generator().manual_seed(0))  # [B, L, 1]
    spectrum = torch.fft.rfft(u[..., 0].double(), dim=-1).abs()  # [B, L/2 + 1]
    freqs = torch.fft.rfftfreq(cfg.length, d=1 / cfg.rate, dtype=torch.float64)
    f = freqs[spectrum.argmax(-1)]  # [B]: each signal's frequency (resolution 1/200)
    assert f.min() >= lo - 0.005 and f.max() <= hi + 0.005
    position = (f.log() - math.log(lo)) / math.log(hi / lo)  # [B], uniform in [0, 1]
    for q in (0.25, 0.5, 0.75):
        assert abs(float((position < q).double().mean()) - q) < 0.07, q
    assert abs(float(f.median()) - math.sqrt(lo * hi)) < 0.04  # uniform: ≈ 0.52
