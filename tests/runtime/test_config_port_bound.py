"""a port one past the largest (65536) is refused naming the flag, not left to bind()."""

from __future__ import annotations

import pytest
from ssmstream.runtime.config import ServerConfig


@pytest.mark.parametrize("name", ["port", "metrics_port"])
def test_port_65536_is_refused(name):
    with pytest.raises(ValueError, match=f"^{name}: must be >= 0 and <= 65535, got 65536$"):
        ServerConfig(model_dir="m", **{name: 65536})
