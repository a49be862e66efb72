"""The scale-out tests' real services: deploy/localcluster.py's classes, plus `require`,
which skips a test (saying why) where redis-server or nginx is not installed.

Both are Debian packages that `make test` installs where it can (the Makefile's
`services` target). Every process binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "deploy"))

import localcluster  # noqa: E402
from localcluster import (  # noqa: E402
    LocalCluster,
    NginxProcess,
    RedisProcess,
    find_binary,
    nginx_config,
)

__all__ = [
    "LocalCluster",
    "NginxProcess",
    "RedisProcess",
    "localcluster",
    "nginx_config",
    "require",
]


def require(binary: str) -> str:
    path = find_binary(binary)
    if path is None:
        pytest.skip(
            f"{binary} is not installed (a Debian package: `make test` installs it when run "
            f"as root with apt-get)"
        )
    return path
