"""The docs name tests, flags and metrics; each one named must exist.

A test cited as proof (`test_faults::test_client_killed_…`, runtime `test_x`, `test_y.py`) is
a test module under tests/ or a test function there; a name ending (or starting) in `…` is a
prefix (suffix) that must match exactly one test, so a renamed or split test breaks the
citation here rather than in a reader's search. Every `--flag` of docs/guarantees.md is an
`ssmstream serve` flag, and every metric the docs name is one the server exports."""

from __future__ import annotations

import ast
import inspect
import re
from collections import defaultdict
from pathlib import Path

import pytest
from ssmstream.runtime.batcher import Batcher
from ssmstream.runtime.config import build_parser

ROOT = Path(__file__).resolve().parent
DOCS = ["README.md", "docs/guarantees.md", "docs/scaleout.md", "docs/theory.md"]


def defined_tests(root: Path = ROOT) -> dict[str, set[str]]:
    """test function name -> the stems of the modules under `root` that define it."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in root.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name.startswith("test_"):
                    found[node.name].add(path.stem)
    return found


TESTS = defined_tests()
MODULES = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("test_*.py")}


def citations(text: str) -> list[tuple[int, str]]:
    """(line, cited name) of every test a doc cites: backticked spans naming `test_…`, and in
    the proof column of a table (the last cell) the spans that go on a name cited before it
    (`…_while_queued_drops_the_request`)."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        spans = re.findall(r"`([^`]+)`", line)
        last = line.rstrip().rstrip("|").rsplit("|", 1)[-1] if line.startswith("|") else ""
        proof = set(re.findall(r"`([^`]+)`", last)) if "test_" in last else set()
        for span in spans:
            if "test_" in span or (span in proof and span.startswith("…")):
                found += [(n, part.strip()) for part in span.split(",")]
    return found


def resolve(cited: str) -> list[str]:
    """What a citation names: module paths or `module::function`s (a valid one names one)."""
    if cited.endswith(".py"):
        tail = cited.removeprefix("tests/")
        return sorted(m for m in MODULES if m == tail or m.endswith("/" + tail))
    module, _, name = cited.rpartition("::")
    module = Path(module.removesuffix(".py")).name.strip("…")
    head, tail = name.startswith("…"), name.endswith("…")
    core = name.strip("…")
    hits = []
    for fn, modules in TESTS.items():
        if head and tail:
            ok = core in fn
        elif tail:
            ok = fn.startswith(core)
        elif head:
            ok = fn.endswith(core)
        else:
            ok = fn == core
        hits += [f"{m}::{fn}" for m in modules if ok and (not module or m == module)]
    return sorted(hits)


CITED = [(doc, n, c) for doc in DOCS for n, c in citations((ROOT.parent / doc).read_text())]


def test_the_docs_cite_tests():
    assert len(CITED) >= 80
    assert {doc for doc, _, _ in CITED} == set(DOCS)


@pytest.mark.parametrize("doc, line, cited", CITED, ids=[f"{d}:{n}" for d, n, _ in CITED])
def test_each_cited_test_exists_once(doc, line, cited):
    hits = resolve(cited)
    assert len(hits) == 1, f"{doc}:{line}: `{cited}` names {hits or 'no test'}"


def test_resolve_tells_a_missing_or_ambiguous_citation():
    assert resolve("test_faults::test_deadline_expiring_mid_batch") == [
        "test_faults::test_deadline_expiring_mid_batch"
    ]
    assert resolve("test_faults::test_deadline_expiring_mid_batches") == []
    assert len(resolve("test_faults::test_deadline_…")) > 1  # a prefix of two tests
    assert resolve("test_fuzz.py") == ["reliability/test_fuzz.py"]
    assert resolve("test_no_such_module.py") == []


def test_every_flag_of_the_guarantees_page_is_a_serve_flag():
    text = (ROOT.parent / "docs" / "guarantees.md").read_text()
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
    serve = {o for a in build_parser()._actions for o in a.option_strings}
    assert flags and not flags - serve, sorted(flags - serve)


def test_every_metric_the_docs_name_is_exported():
    code = "".join(
        (ROOT.parent / "runtime" / f).read_text() for f in ("metrics.py", "replication.py")
    )
    for doc in DOCS:
        text = (ROOT.parent / doc).read_text()
        for name in re.findall(r"\bssmstream_[a-z_]+\b", text):
            if name == "ssmstream_route":  # nginx's variable in deploy/nginx/nginx.conf
                continue
            base = re.sub(r"_total$", "", name)
            families = re.findall(r'f"(ssmstream_\w+_)\{key\}"', code)  # f"…_{key}" for keys
            named = f'"{base}"' in code or any(
                base.startswith(f) and f'("{base.removeprefix(f)}",' in code for f in families
            )
            assert named, f"{doc}: {name} is no metric of the server"


def test_the_per_session_queue_limit_the_guarantees_state_is_the_batchers():
    text = (ROOT.parent / "docs" / "guarantees.md").read_text()
    stated = set(re.findall(r"max_queue_per_session=(\d+)", text))
    stated |= set(re.findall(r"at most (\d+) requests queued", text))
    stated |= set(re.findall(r"at most (\d+) wait behind", text))
    default = inspect.signature(Batcher.__init__).parameters["max_queue_per_session"].default
    assert stated == {str(default)}
