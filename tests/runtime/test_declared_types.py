"""The types the public API declares say what a caller may pass and gets back, so that code
which runs also type-checks:

- the names `ssmstream.runtime` imports lazily are the modules' own to a type checker (not Any);
- the calls whose iterators a caller closes early (their docstrings say so) are declared
  generators, whose close() / aclose() a type checker knows;
- a snapshot parameter takes every bytes-like type, a client's token list and a slab's slot
  list a numpy array, Engine.generate's prompt one token id, SessionService's ttl None (the
  default), as the calls do;
- SessionStore.give_back names every error it hands back."""

from __future__ import annotations

import ast
import types
import typing
from collections.abc import AsyncGenerator, Generator
from pathlib import Path

import numpy as np
import pytest
import ssmstream.runtime as runtime
from ssmstream.runtime.client import (
    AsyncClient,
    AsyncClientSession,
    Client,
    ClientSession,
    create_request,
    generate_request,
)
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import SessionNotFound, Unavailable
from ssmstream.runtime.service import SessionService
from ssmstream.runtime.sessions import SessionStore
from ssmstream.runtime.slab import StateSlab
from ssmstream.runtime.snapshots import decode_snapshot


def test_the_lazy_exports_are_what_type_checkers_see():
    """`from ssmstream.runtime import Engine` is resolved by a module __getattr__, which a
    type checker cannot follow: each name is also imported under TYPE_CHECKING, from the
    module it is loaded from (run time imports nothing more)."""
    tree = ast.parse(Path(runtime.__file__).read_text())
    seen = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1, ast.unparse(imp)
                for alias in imp.names:  # `X as X`: a re-export, so checkers do not drop it
                    assert alias.asname == alias.name, ast.unparse(imp)
                    seen[alias.name] = imp.module
    assert seen == runtime._EXPORTS
    for name, module in seen.items():
        assert getattr(runtime, name).__module__ == f"ssmstream.runtime.{module}"


CLOSED_EARLY = [
    (Engine.generate, Generator),
    (Client.generate, Generator),
    (ClientSession.generate, Generator),
    (ClientSession.regenerate, Generator),
    (ClientSession.stream, Generator),
    (AsyncClient.generate, AsyncGenerator),
    (AsyncClientSession.generate, AsyncGenerator),
    (AsyncClientSession.regenerate, AsyncGenerator),
    (AsyncClientSession.stream, AsyncGenerator),
    (SessionService.generate, AsyncGenerator),
]


def declared(method) -> type:
    return typing.get_origin(typing.get_type_hints(method)["return"])


def admits(hint, value) -> bool:
    """Whether `value` is of the declared type `hint` (a class, a union of them, or generic
    ones: their origins)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = typing.get_args(hint) if union else (hint,)
    return isinstance(value, tuple(typing.get_origin(k) or k for k in kinds))


@pytest.mark.parametrize(
    ("method", "kind"), CLOSED_EARLY, ids=[m.__qualname__ for m, _ in CLOSED_EARLY]
)
def test_iterators_closed_early_are_declared_generators(method, kind):
    assert declared(method) is kind
    assert callable(getattr(declared(method), "aclose" if kind is AsyncGenerator else "close"))


def test_the_declared_generators_are_what_the_calls_return(toy_tok):
    """No call is made: a generator runs (and sends its request) only when iterated."""
    made = [(Engine.generate, toy_tok.generate([1], max_new_tokens=2))]
    client = Client("127.0.0.1:1")
    try:
        s = ClientSession(client, "s")
        made += [
            (Client.generate, client.generate([1])),
            (ClientSession.generate, s.generate([1])),
            (ClientSession.stream, s.stream([[1]])),
        ]
        for method, it in made:
            assert isinstance(it, declared(method)), method.__qualname__
            it.close()
    finally:
        client.close()
    a = AsyncClient("127.0.0.1:1")
    s = AsyncClientSession(a, "s")
    for method, it in [
        (AsyncClient.generate, a.generate([1])),
        (AsyncClientSession.generate, s.generate([1])),
        (AsyncClientSession.stream, s.stream([[1]])),
    ]:
        assert isinstance(it, declared(method)), method.__qualname__


def test_give_back_declares_the_retry_error_it_returns():
    """A lent session that another replica took over meanwhile comes back as Unavailable (the
    client retries), one closed meanwhile as SessionNotFound: both in the declared type."""
    store = SessionStore(4, capacity=4)
    moved, closed, live = store.create(), store.create(), store.create()
    store.lend([moved, closed, live])
    store.drop(moved, "moved")
    store.close(closed.id)
    got = store.give_back([moved, closed, live], 2)
    assert [type(r) for r in got] == [Unavailable, SessionNotFound, int] and got[2] == 2
    (item,) = typing.get_args(typing.get_type_hints(SessionStore.give_back)["return"])
    assert all(admits(item, r) for r in got)
    np.testing.assert_array_equal(store.read(live), np.zeros(4, np.float32))


def test_engine_generate_declares_the_single_token_prompt_it_takes(toy_tok):
    """Its docstring: "a single id may be given as an int". The declared prompt type admits
    one, and one generates what the one-token list does."""
    assert admits(typing.get_type_hints(Engine.generate)["prompt"], 5)
    kw = dict(max_new_tokens=4, temperature=0.9, seed=3)
    assert list(toy_tok.generate(5, **kw)) == list(toy_tok.generate([5], **kw))


SNAPSHOT_TAKERS = [
    (create_request, "snapshot"),
    (Client.create_session, "snapshot"),
    (Client.restore, "snapshot"),
    (AsyncClient.create_session, "snapshot"),
    (AsyncClient.restore, "snapshot"),
    (SessionService.create, "snapshot"),
    (SessionService.restore, "snapshot"),
    (SessionStore.restore, "data"),
    (SessionStore.unpack, "data"),
    (decode_snapshot, "data"),
]


@pytest.mark.parametrize(
    ("call", "param"), SNAPSHOT_TAKERS, ids=[c.__qualname__ for c, _ in SNAPSHOT_TAKERS]
)
def test_snapshot_parameters_declare_every_bytes_like_type(call, param):
    """A snapshot "may come as any bytes-like object" (runtime/snapshots.py; each restores
    the same session: test_snapshot_buffer_types)."""
    hint = typing.get_type_hints(call)[param]
    for kind in (bytes, bytearray, memoryview):
        assert admits(hint, kind(b"SSMSNAP")), kind


TOKEN_TAKERS = [
    (generate_request, "prompt"),
    (generate_request, "stop"),
    (create_request, "prompt"),
    (Client.create_session, "prompt"),
    (Client.generate, "prompt"),
    (ClientSession.generate, "prompt"),
    (ClientSession.regenerate, "prompt"),
    (AsyncClient.create_session, "prompt"),
    (AsyncClient.generate, "prompt"),
    (AsyncClientSession.generate, "prompt"),
    (AsyncClientSession.regenerate, "prompt"),
]


@pytest.mark.parametrize(
    ("call", "param"),
    TOKEN_TAKERS,
    ids=[f"{c.__qualname__}-{p}" for c, p in TOKEN_TAKERS],
)
def test_client_token_lists_declare_the_numpy_arrays_they_take(call, param):
    """As step_request's `tokens` declares: an int array is a token list (each call reads
    it as the list, below; test_client, test_client_hardening send arrays)."""
    assert admits(typing.get_type_hints(call)[param], np.array([1, 2]))


def test_the_client_takes_what_its_token_and_snapshot_parameters_declare():
    by_array = generate_request("s", np.array([1, 2]), stop=np.array([3], np.uint8))
    assert by_array == generate_request("s", [1, 2], stop=[3])
    assert create_request("s", prompt=np.array([[1, 2]])) == create_request("s", prompt=[1, 2])
    for kind in (bytes, bytearray, memoryview):
        assert create_request("s", snapshot=kind(b"SSMSNAP")).snapshot == b"SSMSNAP"


def test_read_rows_declares_the_slot_array_it_takes():
    """export/verify.py reads slab rows by a slot array (test_slab: numpy slots are slots)."""
    assert admits(typing.get_type_hints(StateSlab.read_rows)["slots"], np.array([1, 0]))
    slab = StateSlab(3, 2)
    slab.write(1, np.array([1.0, 2.0], np.float32))
    np.testing.assert_array_equal(slab.read_rows(np.array([1, 0])), [[1.0, 2.0], [0.0, 0.0]])


@pytest.mark.parametrize("call", [SessionService.create, SessionService.restore])
def test_session_service_declares_the_default_ttl_none(call):
    """ttl None (or 0) is the server's default (test_service: ttl None is the default)."""
    assert admits(typing.get_type_hints(call)["ttl"], None)
    assert admits(typing.get_type_hints(call)["ttl"], 2.5)
