"""The ends of each documented closed range are accepted, not refused."""

from __future__ import annotations

from ssmstream.model.layers import DT_RANGE, check_dt_range
from ssmstream.model.train import TrainConfig


def test_the_ends_of_float32s_dt_range_are_accepted():
    low, high = DT_RANGE
    check_dt_range(low, low)
    check_dt_range(low, high)
    check_dt_range(high, high)


def test_negative_seeds_down_to_minus_2_to_the_63_are_accepted():
    """torch.manual_seed takes [-2**63, 2**64 - 1]: a negative seed is a seed."""
    for seed in (-1, -(2**63)):
        assert TrainConfig(seed=seed).seed == seed
