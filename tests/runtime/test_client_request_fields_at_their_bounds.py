"""Request fields and client arguments at the edge of what they allow: the value just inside
a bound is taken and the one just past it refused with a ValueError naming the argument, and
a field whose zero means something (a seed of 0) is sent as given. No call is made."""

from __future__ import annotations

import numpy as np
import pytest
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime.client import (
    Client,
    channel_credentials,
    check_generate,
    create_request,
    generate_request,
    step_request,
)

NOWHERE = "127.0.0.1:1"


def _info(V=10, d_output=None):
    limits = pb.Limits(max_tokens_per_request=4, max_new_tokens=64)
    d = V if d_output is None else d_output
    return pb.ModelInfo(input_kind="tokens", vocab_size=V, d_output=d, limits=limits)


def test_a_seed_of_zero_is_sent_not_taken_as_no_seed():
    """seed is an optional field: unset means random sampling, so 0 must be set."""
    req = generate_request("s", [1], seed=0)
    assert req.HasField("seed") and req.seed == 0
    assert not generate_request("s", [1]).HasField("seed")


def test_d_output_one_past_the_vocabulary_is_refused():
    req = generate_request("s", [1])
    assert check_generate(req, _info(V=10, d_output=10)) is req
    with pytest.raises(ValueError, match=r"^prompt: .*d_output=11 is more than vocab_size=10"):
        check_generate(req, _info(V=10, d_output=11))


@pytest.mark.parametrize("ttl", [False, "", "30"], ids=repr)
def test_a_ttl_that_is_no_number_is_refused_even_when_falsy(ttl):
    with pytest.raises(ValueError, match="^ttl: must be a number"):
        create_request("s", ttl=ttl)
    assert create_request("s", ttl=0).ttl_seconds == 0.0
    assert create_request("s", ttl=None).ttl_seconds == 0.0


@pytest.mark.parametrize("values", [[True, False], np.array([[1], [0]], dtype=bool)], ids=repr)
def test_values_that_are_all_bools_are_refused(values):
    with pytest.raises(ValueError, match=r"^values: must be real numbers \(got bool\)"):
        step_request("s", values=values)


@pytest.mark.parametrize("timeout", [0.0009, 2147484.0], ids=repr)
def test_a_keepalive_timeout_just_past_its_range_is_refused(timeout):
    with pytest.raises(ValueError, match=r"^keepalive_timeout: must be in \[0.001, 2147483\]"):
        Client(NOWHERE, keepalive_timeout=timeout)
    with Client(NOWHERE, keepalive_timeout=0.001) as c:
        assert dict(c.options)["grpc.keepalive_timeout_ms"] == 1


def test_max_new_tokens_one_past_the_servers_limit_is_refused():
    assert check_generate(generate_request("s", [1], max_new_tokens=64), _info()).max_new_tokens
    with pytest.raises(
        ValueError, match=r"^max_new_tokens: must be an integer in \[1, 64\], got 65"
    ):
        check_generate(generate_request("s", [1], max_new_tokens=65), _info())


@pytest.mark.parametrize("field", ["prompt", "stop"])
def test_the_token_id_equal_to_the_vocabulary_size_is_refused(field):
    kw = {"prompt": [10]} if field == "prompt" else {"prompt": [1], "stop": [10]}
    req = generate_request("s", **kw)
    with pytest.raises(ValueError) as e:
        check_generate(req, _info(V=10))
    assert str(e.value) == f"{field}: token 10 is outside [0, vocab_size=10)"
    assert check_generate(generate_request("s", [9], stop=[9]), _info(V=10))


@pytest.mark.parametrize("given", ["client_key", "client_cert"])
def test_a_client_key_or_certificate_alone_is_refused_not_plaintext(given):
    pem = b"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"
    with pytest.raises(ValueError, match="^client_cert/client_key: give both for mTLS"):
        channel_credentials(**{given: pem})


def test_the_default_keepalive_waits_twenty_seconds_for_a_ping():
    with Client(NOWHERE) as c:
        options = dict(c.options)
    assert options["grpc.keepalive_time_ms"] == 300_000
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 20_000


@pytest.mark.parametrize("options", [{"grpc.enable_retries": 0}, "ab"], ids=repr)
def test_options_that_are_a_dict_or_a_string_are_named_whole(options):
    with pytest.raises(ValueError) as e:
        Client(NOWHERE, options=options)
    assert str(e.value) == (
        f"options: must be (name, value) pairs, as grpc's channel options, got {options!r}"
    )
