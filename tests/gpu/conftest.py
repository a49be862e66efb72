"""Fixtures and the CUDA skip hook for tests/gpu.

Tests marked `@pytest.mark.cuda` are skipped, with the reason, when onnxruntime's CUDA provider
is not usable here (`ssmstream.runtime.providers.cuda_usable`). The model fixtures reuse the
builders of tests/runtime/conftest.py (the same cached tiny exports and hand-built toys):

    toy_token_model / toy_signal_model: {"model_dir", "reference", ...} (numpy reference)
    tiny_token_model: {"model_dir", "ckpt_dir", "net", "config"} (real export, cached)
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from ssmstream.runtime.providers import cuda_usable

_spec = importlib.util.spec_from_file_location(
    "ssmstream_tests_runtime_conftest", Path(__file__).parents[1] / "runtime" / "conftest.py"
)
_rt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_rt)


def pytest_collection_modifyitems(config, items):
    usable, why = cuda_usable()
    if usable:
        return
    skip = pytest.mark.skip(reason=f"needs CUDA: {why}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def toy_token_model(tmp_path) -> dict:
    return _rt.build_toy(tmp_path / "toy_tokens", kind="tokens")


@pytest.fixture
def toy_signal_model(tmp_path) -> dict:
    return _rt.build_toy(tmp_path / "toy_signal", kind="values")


@pytest.fixture(scope="session")
def tiny_token_model(request, tmp_path_factory) -> dict:
    return _rt._export_tiny(request, tmp_path_factory, "tokens", _rt.TINY_TOKEN, seed=0)
