"""the integer settings whose 0 means "off" accept 0 (and refuse -1)."""

from __future__ import annotations

import pytest
from ssmstream.runtime.config import ServerConfig, parse_config


@pytest.mark.parametrize(
    "name", ["rewind_window", "max_sessions_per_principal", "max_concurrent_rpcs"]
)
def test_zero_is_accepted_and_minus_one_refused(name):
    assert getattr(ServerConfig(model_dir="m", **{name: 0}), name) == 0
    with pytest.raises(ValueError, match=f"^{name}: must be >= 0"):
        ServerConfig(model_dir="m", **{name: -1})


def test_rewind_window_zero_from_the_command_line_turns_rewind_off():
    assert parse_config(["m", "--rewind-window", "0"]).rewind_window == 0
