"""Each serve flag reaches the part that acts on it: a server started with a setting other
than the default behaves as that setting says (not as the default does)."""

from __future__ import annotations

import pytest
from grpc_helpers import serve, target
from ssmstream.runtime.client import Client

TOKENS = {"tok-alice-0123456789": "alice", "tok-bob-0123456789ab": "bob"}


@pytest.mark.parametrize("scope, bob_cached", [("global", 256), ("principal", 0)])
def test_prefix_cache_scope_decides_whether_principals_share_prompts(
    toy_token_model, tmp_path, scope, bob_cached
):
    """--prefix-cache-scope global: a prompt alice's session filled the cache with is a hit
    for bob's; principal (the default): it is not."""
    f = tmp_path / "tokens"
    f.write_text("".join(f"{t} {p}\n" for t, p in TOKENS.items()))
    prompt = [(5 * j + 2) % toy_token_model["V"] for j in range(256)]
    with serve(
        toy_token_model["model_dir"],
        auth_tokens=str(f),
        prefix_cache_mb=1.0,
        prefix_cache_scope=scope,
        max_tokens_per_request=1024,
    ) as srv:
        alice, bob = (Client(target(srv), token=t, timeout=10) for t in TOKENS)
        with alice, bob:
            first = alice.create_session(prompt=prompt)
            again = alice.create_session(prompt=prompt)
            other = bob.create_session(prompt=prompt)
    assert (first.cached_tokens, again.cached_tokens) == (0, 256)
    assert other.cached_tokens == bob_cached
    assert first.position == again.position == other.position == 256


def test_max_batch_delay_is_how_long_a_step_waits_for_the_other_active_sessions(toy_token_model):
    """--max-batch-delay 0.5: while another session is active (it stepped a moment ago), a
    step of one session waits up to 0.5 s for the other's to join its batch; a lone session
    (the other closed) does not wait."""
    import time

    with serve(toy_token_model["model_dir"], max_batch_delay=0.5) as srv:
        with Client(target(srv), timeout=10) as c:
            a, b = c.create_session(), c.create_session()
            b.step(tokens=[1])
            t0 = time.perf_counter()
            assert a.step(tokens=[2]).position == 1
            waited = time.perf_counter() - t0
            b.close()
            t0 = time.perf_counter()
            assert a.step(tokens=[3]).position == 2
            alone = time.perf_counter() - t0
    assert waited >= 0.45, waited
    assert alone < 0.4, alone  # ~2 ms: a margin for a loaded machine


def test_engine_flags_reach_the_engine_the_server_opens(toy_token_model):
    """--threads is the prefill graph's intra-op pool, --step-threads the step graph's (not
    the other way round, nor one for both); --tf32 and --cuda-graphs land in the engine's
    CUDA options under their own names."""
    with serve(
        toy_token_model["model_dir"], threads=3, step_threads=2, tf32=True, cuda_graphs=False
    ) as srv:
        e = srv.server.engine
        step = e._step_session.get_session_options().intra_op_num_threads
        prefill = e._prefill_session.get_session_options().intra_op_num_threads
        options = (e.cuda_options.use_tf32, e.cuda_options.enable_cuda_graph)
    assert (step, prefill) == (2, 3)
    assert options == (True, False)


def test_metrics_listen_on_the_servers_host_only(toy_token_model):
    """--metrics-port listens on --host, like the gRPC port: a server on 127.0.0.2 answers
    scrapes there and nowhere else (not on 127.0.0.1, as it would bound to every address)."""
    import socket
    import urllib.request

    with serve(toy_token_model["model_dir"], host="127.0.0.2", metrics_port=0) as srv:
        port = srv.server.metrics_port
        url = f"http://127.0.0.2:{port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert "ssmstream_" in text


def test_session_ttl_is_how_long_a_session_created_without_one_lives_idle(toy_token_model):
    """--session-ttl 0.6: a session created without a ttl of its own is gone (evicted) once
    idle for longer than 0.6 s; one that keeps stepping (every 0.1 s: a margin for a loaded
    machine) stays."""
    import time

    import grpc

    with serve(toy_token_model["model_dir"], session_ttl=0.6) as srv:
        with Client(target(srv), timeout=10) as c:
            idle, busy = c.create_session(), c.create_session()
            for _ in range(5):
                time.sleep(0.1)
                busy.step(tokens=[1])
            time.sleep(0.3)  # the idle one: 0.8 s and more
            with pytest.raises(grpc.RpcError) as e:
                idle.step(tokens=[1])
            assert busy.step(tokens=[1]).position == 6
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "evicted" in e.value.details()
