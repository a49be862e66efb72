"""Fixtures of the reliability suite: the toy models (see rel_helpers.py for what they are
and for the helpers the tests import)."""

from __future__ import annotations

import pytest
from rel_helpers import build_toy

# --- models -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> dict:
    """The token toy model: V = D = 11 (its outputs are logits over the vocabulary, as the
    contract has it for token models), S = 8, prefill chunk 4, max_len 12."""
    return build_toy(tmp_path_factory.mktemp("rel_toy_tokens"), "tokens", V=11, d_out=11, seed=0)


@pytest.fixture(scope="session")
def toy_values(tmp_path_factory) -> dict:
    """The values toy model (d_input=3, S=8, D=5)."""
    return build_toy(tmp_path_factory.mktemp("rel_toy_values"), "values", seed=0)


@pytest.fixture(scope="session")
def toy_other(tmp_path_factory) -> dict:
    """Another token model with the same shapes (other weights, so another step sha)."""
    return build_toy(tmp_path_factory.mktemp("rel_toy_other"), "tokens", V=11, d_out=11, seed=7)
