"""What `pip install ssmstream[EXTRAS]` installs is what each subcommand imports: every
`ssmstream` subcommand starts with only the distributions its extras bring (followed
through the installed packages' own requirements); nothing else is importable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions(extras: list[str]) -> set[str]:
    """Every distribution `pip install ssmstream[extras]` brings (on this platform)."""
    todo = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in extras:
        todo += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    found: set[str] = set()
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if norm(req.name) == "ssmstream":  # ssmstream[train] inside another extra
            todo += [
                Requirement(r) for e in req.extras for r in PROJECT["optional-dependencies"][e]
            ]
            continue
        if norm(req.name) in found:
            continue
        found.add(norm(req.name))
        try:
            todo += [Requirement(r) for r in metadata.requires(req.name) or []]
        except metadata.PackageNotFoundError:
            pass
    return found


def importable(extras: list[str]) -> list[str]:
    dists = distributions(extras)
    names = {"ssmstream", "_distutils_hack"} | {
        m for m, owners in metadata.packages_distributions().items()
        if any(norm(o) in dists for o in owners)
    }  # fmt: skip
    return sorted(names)


ONLY = r"""
import importlib.abc, json, sys
allowed = set(json.loads(sys.argv[1])) | set(sys.stdlib_module_names)

class Only(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in allowed or top.startswith("_"):
            return None
        raise ModuleNotFoundError(f"No module named {top!r} (not installed by these extras)")

sys.meta_path.insert(0, Only())
for module in json.loads(sys.argv[2]):
    __import__(module)
from ssmstream.runtime.cli import main
raise SystemExit(main(json.loads(sys.argv[3])))
"""


@pytest.mark.parametrize(
    "command, extras, modules",
    [
        ("serve", ["serve"], ["ssmstream.runtime.server", "ssmstream.runtime.metrics"]),
        ("generate", [], ["ssmstream.runtime.generate", "ssmstream.runtime.client"]),
        ("info", [], ["ssmstream.runtime.info"]),
        ("bench", [], ["ssmstream.runtime.bench"]),
        ("train", ["train"], ["ssmstream.model.train"]),
        ("export", ["export"], ["ssmstream.export.exporter", "ssmstream.export.verify"]),
        ("plot", ["plots"], ["ssmstream.model.plots"]),
    ],
)
def test_each_subcommand_starts_with_its_extras_alone(command, extras, modules):
    args = [json.dumps(importable(extras)), json.dumps(modules), json.dumps([command, "--help"])]
    r = subprocess.run(
        [sys.executable, "-c", ONLY, *args], capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(ROOT), env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert r.returncode == 0, f"ssmstream {command} with ssmstream{extras}:\n{r.stderr[-800:]}"


@pytest.mark.parametrize(
    "platform, machine, wanted",
    [
        ("linux", "x86_64", "onnxruntime-gpu"),
        ("linux", "aarch64", "onnxruntime"),  # edge devices: no onnxruntime-gpu wheel
        ("darwin", "arm64", "onnxruntime"),
        ("win32", "AMD64", "onnxruntime-gpu"),  # published for Windows x86_64 too
        ("win32", "ARM64", "onnxruntime"),
    ],
)
def test_one_onnxruntime_build_fits_each_platform(platform, machine, wanted):
    env = {"sys_platform": platform, "platform_machine": machine, "extra": ""}
    picked = [
        norm(r.name) for r in map(Requirement, PROJECT["dependencies"])
        if r.name.startswith("onnxruntime") and (r.marker is None or r.marker.evaluate(env))
    ]  # fmt: skip
    assert picked == [wanted]
