"""Fixtures for the scale-out tests: a real redis-server (skipped, saying why, without one)."""

from __future__ import annotations

import pytest
from services import RedisProcess, require


@pytest.fixture
def redis_server(tmp_path):
    require("redis-server")
    r = RedisProcess(tmp_path)
    yield r
    r.stop()
