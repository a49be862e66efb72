"""The `ssmstream serve` defaults users are told about: those README.md and docs/ state, the
address `ssmstream generate` connects to by default, and the safe ones (loopback only, a
prefix cache per principal, responses a gRPC client receives by default); and the least
value each count takes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ssmstream.runtime import generate
from ssmstream.runtime.config import ServerConfig, build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "doc, flag, field",
    [
        ("README.md", "--prefix-cache-mb", "prefix_cache_mb"),
        ("README.md", "--rewind-window", "rewind_window"),
        ("README.md", "--rewind-memory-mb", "rewind_memory_mb"),
    ],
)
def test_documented_defaults_are_the_defaults(doc, flag, field):
    text = (ROOT / doc).read_text()
    stated = re.findall(rf"`{flag}`[^`]*?\(default (\d+)", text)
    assert stated, f"{doc} no longer states the default of {flag}"
    parsed = vars(build_parser().parse_args(["m"]))[field]
    assert {float(s) for s in stated} == {float(parsed)}


def test_the_documented_persist_every_default_is_the_default():
    text = (ROOT / "docs" / "scaleout.md").read_text()
    (stated,) = re.findall(r"\(default `([^`]+)`\)", text)
    assert ServerConfig(model_dir="m").persist_every == stated


def test_the_server_listens_where_the_generate_client_connects_by_default():
    """A server started without --host/--port is reachable by `ssmstream generate` without
    --server, and only from this machine (README: 127.0.0.1 unless --host says otherwise)."""
    cfg = ServerConfig(model_dir="m")
    assert cfg.address == generate.build_parser().get_default("server") == "127.0.0.1:50051"


def test_the_default_settings_keep_tenants_apart_and_fit_a_grpc_clients_receive_limit():
    cfg = ServerConfig(model_dir="m")
    assert cfg.prefix_cache_scope == "principal"  # docs/guarantees.md: per principal by default
    assert cfg.auth_tokens is None and cfg.tls_cert is None
    assert cfg.max_message_bytes == 4 * 2**20  # a gRPC client's default receive limit


@pytest.mark.parametrize(
    "name", ["max_sessions", "max_batch", "max_tokens_per_request", "max_new_tokens",
             "max_message_bytes"],
)  # fmt: skip
def test_limits_that_zero_would_make_useless_start_at_one(name):
    """0 is no "no limit" for these (every request, Generate or session would be refused):
    it is refused naming the field, and 1 is the least accepted."""
    with pytest.raises(ValueError, match=f"^{name}: must be >= 1"):
        ServerConfig(model_dir="m", **{name: 0})
    assert getattr(ServerConfig(model_dir="m", **{name: 1}), name) == 1


@pytest.mark.parametrize("name", ["max_batch", "port", "rewind_window", "threads"])
def test_a_bool_is_not_a_count(name):
    """True is an int to Python, not a count or a port to a config built in Python: it is
    refused naming the field (it had become 1)."""
    with pytest.raises(ValueError, match=f"^{name}: must be an integer, got True"):
        ServerConfig(model_dir="m", **{name: True})
