"""Modes that decay fast but have not vanished keep their powers.

`vandermonde` counts a mode as gone only below sqrt(tiny) of its dtype (its powers from
l = 1 on underflow there); a mode of |Ā| = 1e-6 still adds Ā·B̄·C at l = 1 and must not be
dropped. Checked against powers taken by repeated multiplication.
"""

from __future__ import annotations

import pytest
import torch
from ssmstream.model import ssm


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_vandermonde_keeps_the_powers_of_a_small_live_mode(dtype):
    dA = torch.tensor([1e-6 * (0.6 + 0.8j), 1e-4j, 0.5 - 0.5j], dtype=dtype)  # [N]
    V = ssm.vandermonde(dA, 4)  # [N, L]
    ref = torch.stack([torch.ones_like(dA), dA, dA * dA, dA * dA * dA], -1)  # [N, L]
    # relative to each entry: the small powers are what is checked
    rel = ((V - ref).abs() / ref.abs()).max()
    assert rel < 1e-5, rel
