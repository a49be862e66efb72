"""`ssmstream generate` without --max-new-tokens on a server whose --max-new-tokens is below the
flag's default (200): it generates what the server allows, not a usage error about a flag
the user never gave ("max_new_tokens: must be an integer in [1, 50], got 200"). A prompt
longer than the server's --max-tokens-per-request is one line naming that limit."""

from __future__ import annotations

import pytest
from ssmstream.runtime import cli
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.server import BackgroundServer


@pytest.fixture(scope="module")
def low_limit_server(tiny_token_model):
    cfg = ServerConfig(
        model_dir=str(tiny_token_model["model_dir"]), port=0, device="cpu", grace=0.2,
        max_new_tokens=50, max_tokens_per_request=8,
    )  # fmt: skip
    with BackgroundServer(cfg) as srv:
        yield srv


def test_the_default_follows_a_lower_server_limit(low_limit_server, capsys):
    argv = ["generate", "--server", f"127.0.0.1:{low_limit_server.port}", "--ids", "1"]
    assert cli.main([*argv, "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 50 and not err


def test_an_explicit_value_over_the_limit_is_still_refused(low_limit_server, capsys):
    argv = ["generate", "--server", f"127.0.0.1:{low_limit_server.port}", "--ids", "1"]
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--max-new-tokens", "200"])
    assert e.value.code == 2
    assert "error: --max-new-tokens: must be an integer in [1, 50], got 200" in (
        capsys.readouterr().err
    )


def test_a_prompt_longer_than_the_server_takes_is_one_line_naming_the_limit(
    low_limit_server, capsys
):
    argv = ["generate", "--server", f"127.0.0.1:{low_limit_server.port}", "--ids"]
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, ",".join(["1"] * 9)])
    assert e.value.code == 2
    said = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith((" ", "usage:"))]
    assert said == [
        "ssmstream generate: error: prompt: needs 1 to 8 tokens (the server's "
        "--max-tokens-per-request), got 9"
    ]
    assert cli.main([*argv, ",".join(["1"] * 8), "--max-new-tokens", "1"]) == 0
