"""examples/stream_client.py on models that are not plain byte models: token ids past 255
are left out of the printed text (not a crash), and a model that is not byte-level is refused
naming the positional `text`, not a flag the script does not have."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "examples"))

from scripts import load_script  # noqa: E402

grpc_helpers = load_script("tests/runtime/grpc_helpers.py")
build_toy = load_script("tests/runtime/conftest.py").build_toy


def test_stream_client_survives_tokens_above_255(tmp_path, capsys):
    sc = load_script("examples/stream_client.py")
    toy = build_toy(tmp_path / "v300", "tokens", V=300, d_out=300)
    with grpc_helpers.serve(toy["model_dir"]) as srv:
        rc = sc.main(["abc", "--server", grpc_helpers.target(srv),
                      "--max-new-tokens", "64", "--temperature", "5.0"])  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out.count("--- ") == 2


def test_not_byte_level_model_error_names_an_existing_argument(tmp_path, capsys):
    """On a vocab-11 model the usage error read "--prompt: token 97 is outside [0,
    vocab_size=11)": stream_client.py has no --prompt flag (the prompt is the positional
    `text`), because examples/stream_client.py:61-62 turns any check_generate field into
    `--field`."""
    import pytest

    sc = load_script("examples/stream_client.py")
    toy = build_toy(tmp_path / "v11", "tokens")
    with grpc_helpers.serve(toy["model_dir"]) as srv:
        with pytest.raises(SystemExit):
            sc.main(["abc", "--server", grpc_helpers.target(srv), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert "--prompt" not in err, err.strip().splitlines()[-1]
