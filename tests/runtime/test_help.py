"""help() answers: every public method and property of the classes an embedding program
calls (the Engine, the session store and service, the batcher, snapshot keys, state slabs,
step buffers, the sampler) and of those an application of a server calls (both clients,
their session handles, stream handles and step results) has a docstring, and
help(ssmstream.runtime) names every class the README imports from the package."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from ssmstream.runtime import Batcher, Engine, Sampler, SessionStore, StateSlab, StepBuffers
from ssmstream.runtime.client import (
    AsyncClient,
    AsyncClientSession,
    AsyncStreamHandle,
    Client,
    ClientSession,
    StepResult,
    StreamHandle,
)
from ssmstream.runtime.service import Attachment, SessionService
from ssmstream.runtime.snapshots import SnapshotKey

CLASSES = [
    Engine, SessionStore, Batcher, SessionService, Attachment, SnapshotKey, StateSlab,
    StepBuffers, Sampler,
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
def test_every_public_method_says_what_it_does(cls):
    assert undocumented(cls) == [], f"{cls.__name__}: no docstring"


def test_undocumented_finds_a_method_without_a_docstring():
    class Half:
        def said(self):
            """Documented."""

        def blank(self):
            """ """

        def silent(self):
            pass

        async def quiet(self):
            pass

        @property
        def value(self):
            return 1

        @classmethod
        def make(cls):
            return cls()

        def _private(self):
            pass

    assert undocumented(Half) == ["blank", "silent", "quiet", "value", "make"]


def test_help_of_the_package_names_every_class_the_readme_imports_from_it():
    import ssmstream.runtime

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    imported = set()
    for names in re.findall(r"^from ssmstream\.runtime(?:\.\w+)? import (.+)$", readme, re.M):
        imported |= {n.strip() for n in names.split(",")}
    assert {"Engine", "SessionService", "Client"} <= imported
    told = set(re.findall(r"\w+", ssmstream.runtime.__doc__))
    assert imported <= told, sorted(imported - told)
