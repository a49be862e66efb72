"""--lease-ttl takes the documented closed range [0.05, 3600] seconds."""

from __future__ import annotations

import pytest
from ssmstream.runtime.config import ServerConfig


@pytest.mark.parametrize("ttl", [0.05, 3600, 3600.0])
def test_lease_ttl_bounds_are_inclusive(ttl):
    assert ServerConfig(model_dir="m", lease_ttl=ttl).lease_ttl == ttl


@pytest.mark.parametrize("ttl", [0.0499, 3600.001, float("nan")])
def test_lease_ttl_outside_the_range_is_refused(ttl):
    with pytest.raises(ValueError, match=r"^lease_ttl: must be in \[0.05, 3600\] seconds"):
        ServerConfig(model_dir="m", lease_ttl=ttl)
