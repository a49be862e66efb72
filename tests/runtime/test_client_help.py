"""help() on the Python clients answers: every public method and property of the objects an
application calls (both clients, their session handles, stream handles and step results)
has a docstring, so a program can be written from help() and the README alone."""

from __future__ import annotations

import inspect

import pytest
from ssmstream.runtime.client import (
    AsyncClient,
    AsyncClientSession,
    AsyncStreamHandle,
    Client,
    ClientSession,
    StepResult,
    StreamHandle,
)

CLASSES = [
    Client, ClientSession, StreamHandle, AsyncClient, AsyncClientSession, AsyncStreamHandle,
    StepResult,
]  # fmt: skip


def undocumented(cls: type) -> list[str]:
    """The public methods and properties `cls` defines whose docstring is missing or blank
    (an inherited one is its base class's to say)."""
    names = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (classmethod, staticmethod)):
            member = member.__func__
        if (isinstance(member, property) or inspect.isfunction(member)) and not (
            (member.__doc__ or "").strip()
        ):
            names.append(name)
    return names


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_every_public_method_of_the_clients_says_what_it_does(cls):
    assert undocumented(cls) == [], f"{cls.__name__}: no docstring"


def test_undocumented_finds_methods_and_properties_without_a_docstring():
    class Half:
        def said(self):
            """Documented."""

        async def silent(self):
            pass

        @property
        def value(self):
            return 1

        @classmethod
        def make(cls):
            """ """

        def _private(self):
            pass

    assert undocumented(Half) == ["silent", "value", "make"]
