"""Toy models for the example scripts' tests (built as tests/runtime/conftest.py builds them)."""

from __future__ import annotations

import pytest
from scripts import load_script

build_toy = load_script("tests/runtime/conftest.py").build_toy


@pytest.fixture(scope="module")
def byte_toy(tmp_path_factory) -> dict:
    """A tokens model over the 256 byte values."""
    return build_toy(tmp_path_factory.mktemp("byte_toy"), "tokens", V=256, d_out=256)


@pytest.fixture(scope="module")
def values_toy(tmp_path_factory) -> dict:
    """A values model: 3 inputs, 5 outputs."""
    return build_toy(tmp_path_factory.mktemp("values_toy"), "values", d_in=3, d_out=5)
