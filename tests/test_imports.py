"""The import rules of DESIGN.md, checked statically: `ast` over every source file of the
four packages, nothing imported.

    model ↛ export, runtime, protos
    export → model, onnx, and runtime's public contract only (manifest, errors, Engine)
    runtime core ↛ torch, model, export, grpc   (core: every runtime module but the adapters)
    servicer, server, client ↛ torch, model, export
    protos ↛ anything of ours

Every `import` / `from … import` counts, relative ones and those inside functions
included, and so does `importlib.import_module("literal")`. A name is matched on dotted
boundaries (`torch` covers `torch.nn`, not `torchvision`). Besides its own imports, a
module is charged with what it reaches through other modules of ours (`sessions → auth →
grpc` breaks the core rule), except under the export rule, which is about export's own
imports. Folders map onto `ssmstream.*` as pyproject.toml's package-dir says.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# runtime modules that are not core: the gRPC adapters, the CLIs and the server's policies
RUNTIME_EDGE = {
    "servicer",
    "status",
    "server",
    "health",
    "admission",
    "client",
    "generate",
    "client_flags",
    "probe",
    "cli",
    "auth",
    "metrics",
    "replication",
    "bench",
    "info",
}
ADAPTERS = {
    "servicer", "status", "server", "health", "admission", "client", "generate", "client_flags",
    "probe",
}  # fmt: skip
GRPC = ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "ssmstream.protos")


@dataclass(frozen=True)
class Module:
    name: str  # "ssmstream.runtime.engine"
    source: str
    is_package: bool = False  # an __init__.py: relative imports start at itself
    path: str = "<string>"


@dataclass(frozen=True)
class Import:
    target: str  # "ssmstream.runtime.manifest.load_manifest", "torch.nn"
    line: int


@dataclass(frozen=True)
class Rule:
    text: str  # the rule as DESIGN.md states it
    sources: tuple[str, ...]  # modules it applies to (and their submodules)
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()  # exceptions inside `forbidden`
    transitive: bool = True  # also what the module reaches through modules of ours
    skip: tuple[str, ...] = ()  # modules under `sources` it does not apply to

    def applies_to(self, module: str) -> bool:
        return within(module, self.sources) and not within(module, self.skip)

    def breaks(self, target: str) -> bool:
        return within(target, self.forbidden) and not within(target, self.allowed)


RULES = (
    Rule(
        "model ↛ export, runtime, protos",
        ("ssmstream.model",),
        ("ssmstream.export", "ssmstream.runtime", "ssmstream.protos"),
    ),
    Rule(
        "export → model, onnx, and runtime's public contract only",
        ("ssmstream.export",),
        ("ssmstream.runtime", "ssmstream.protos"),
        allowed=(
            "ssmstream.runtime.manifest",
            "ssmstream.runtime.errors",
            "ssmstream.runtime.engine",
            "ssmstream.runtime.Engine",
        ),
        transitive=False,  # the contract's own imports are runtime's business
    ),
    Rule(  # the pb2 stubs count as gRPC: core speaks arrays, the servicer speaks protobuf
        "runtime core ↛ torch, model, export, grpc",
        ("ssmstream.runtime",),
        ("torch", "ssmstream.model", "ssmstream.export", *GRPC),
        skip=tuple(f"ssmstream.runtime.{m}" for m in RUNTIME_EDGE),
    ),
    Rule(
        "servicer, server, client ↛ torch, model, export",
        tuple(f"ssmstream.runtime.{m}" for m in ADAPTERS),
        ("torch", "ssmstream.model", "ssmstream.export"),
    ),
    Rule(
        "protos ↛ anything of ours",
        ("ssmstream.protos",),
        ("ssmstream.model", "ssmstream.export", "ssmstream.runtime"),
    ),
)

# Known violations of today's tree, (importing module, imported name) -> why and what next.
# Keep it short; test_allow_list_is_not_stale fails once an entry is fixed.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


def within(name: str, prefixes: Iterable[str]) -> bool:
    """`name` is one of `prefixes` or inside one of them (dotted boundaries)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imports_of(module: Module) -> list[Import]:
    """Every name `module` imports, absolute, wherever the statement sits in the file."""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(module.source, module.path)):
        if isinstance(node, ast.Import):
            found += [Import(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..model import y
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{module.path}:{node.lineno}: relative import beyond top")
                anchor = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base else anchor
            found += [
                Import(base if a.name == "*" else f"{base}.{a.name}", node.lineno)
                for a in node.names
            ]
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            found.append(Import(node.args[0].value, node.lineno))
    return found


def read_tree(root: Path = ROOT) -> dict[str, Module]:
    """Our modules by name, from pyproject's package-dir mapping (folder → ssmstream.x)."""
    pyproject = (root / "pyproject.toml").read_text()
    section = pyproject.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    mapping = dict(re.findall(r'^"(ssmstream\.\w+)"\s*=\s*"([\w/]+)"', section, flags=re.M))
    assert set(mapping) == {f"ssmstream.{p}" for p in ("model", "export", "runtime", "protos")}
    modules = {}
    for package, folder in mapping.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *(parts[:-1] if is_package else parts)))
            rel = str(path.relative_to(root))
            modules[name] = Module(name, path.read_text(), is_package, rel)
    return modules


def _ours(target: str, modules: dict[str, Module]) -> list[str]:
    """Modules of ours that importing `target` runs: the packages on the way and the module."""
    parts = target.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in modules]


def violations(modules: dict[str, Module]) -> list[tuple[str, str, str]]:
    """(importing module, imported name, message) for every broken rule."""
    direct = {name: imports_of(m) for name, m in modules.items()}
    found = {}
    for rule in RULES:
        for name in filter(rule.applies_to, modules):
            # breadth-first over what `name` reaches; `via` keeps one path to each module
            via = {name: [name]}
            queue = [name]
            while queue:
                current = queue.pop(0)
                for imp in direct[current]:
                    if rule.breaks(imp.target):
                        where = f"{modules[current].path}:{imp.line}"
                        how = f"imports {imp.target}"
                        if current != name:
                            how = f"reaches {imp.target} through {' → '.join(via[current])}"
                        found.setdefault(
                            (name, imp.target), f"{where}: {name} {how} — breaks '{rule.text}'"
                        )
                    if not rule.transitive:
                        continue
                    for nxt in _ours(imp.target, modules):
                        if nxt not in via:
                            via[nxt] = via[current] + [nxt]
                            queue.append(nxt)
    return [(src, target, msg) for (src, target), msg in sorted(found.items())]


def unexplained(found: list[tuple[str, str, str]]) -> list[str]:
    return [
        msg
        for src, target, msg in found
        if not any(src == s and within(target, [t]) for s, t in KNOWN_VIOLATIONS)
    ]


# --- the tree -----------------------------------------------------------------------------


def test_the_tree_keeps_the_import_rules():
    modules = read_tree()
    for must in ("ssmstream.model.ssm", "ssmstream.export.exporter", "ssmstream.runtime.engine"):
        assert must in modules  # the mapping found the packages
    bad = unexplained(violations(modules))
    assert not bad, "import rules of DESIGN.md broken:\n" + "\n".join(bad)


def test_allow_list_is_not_stale():
    found = violations(read_tree())
    for (src, target), why in KNOWN_VIOLATIONS.items():
        assert any(s == src and within(t, [target]) for s, t, _ in found), (
            f"{src} no longer imports {target}: drop it from KNOWN_VIOLATIONS ({why})"
        )


# --- the checker itself -------------------------------------------------------------------


def _tree(**sources: str) -> dict[str, Module]:
    """Synthetic modules: keyword `runtime__sessions` is ssmstream.runtime.sessions."""
    modules = {}
    for key, text in sources.items():
        name = "ssmstream." + key.replace("__", ".")
        is_package = "." not in name.removeprefix("ssmstream.")
        modules[name] = Module(name, text, is_package, f"{key}.py")
    return modules


def test_checker_resolves_relative_and_nested_imports():
    m = Module(
        "ssmstream.runtime.batcher",
        "from . import engine\nfrom ..model.ssm import discretize\n"
        "def f():\n    import grpc.aio\n    from .sessions import *\n"
        "importlib.import_module('torch')\n",
    )
    assert [i.target for i in imports_of(m)] == [
        "ssmstream.runtime.engine",
        "ssmstream.model.ssm.discretize",
        "grpc.aio",
        "ssmstream.runtime.sessions",
        "torch",
    ]
    pkg = Module("ssmstream.runtime", "from .engine import Engine\n", is_package=True)
    assert [i.target for i in imports_of(pkg)] == ["ssmstream.runtime.engine.Engine"]


@pytest.mark.parametrize(
    "sources, source, target",
    [
        ({"runtime__sessions": "import torch.nn as nn"}, "ssmstream.runtime.sessions", "torch.nn"),
        (
            {"runtime__engine": "def f():\n    from ..export import exporter"},
            "ssmstream.runtime.engine",
            "ssmstream.export.exporter",
        ),
        ({"runtime__batcher": "import grpc"}, "ssmstream.runtime.batcher", "grpc"),
        (
            {"model__ssm": "from ..runtime import Engine"},
            "ssmstream.model.ssm",
            "ssmstream.runtime.Engine",
        ),
        (
            {"export__verify": "from ssmstream.runtime.sessions import SessionStore"},
            "ssmstream.export.verify",
            "ssmstream.runtime.sessions.SessionStore",
        ),
        ({"runtime__servicer": "import torch"}, "ssmstream.runtime.servicer", "torch"),
        (
            {"protos__x_pb2": "from ssmstream.runtime import errors"},
            "ssmstream.protos.x_pb2",
            "ssmstream.runtime.errors",
        ),
        (  # sessions is core; auth is not, but sessions reaches grpc through it
            {
                "runtime__sessions": "from .auth import current_principal",
                "runtime__auth": "import grpc",
            },
            "ssmstream.runtime.sessions",
            "grpc",
        ),
    ],
)
def test_checker_reports_a_broken_rule(sources, source, target):
    found = violations(_tree(**sources))
    assert (source, target) in [(s, t) for s, t, _ in found], found
    assert unexplained(found)


def test_checker_accepts_what_the_rules_allow():
    ok = _tree(
        runtime__auth="import grpc",  # not core
        runtime__server="import grpc\nfrom .engine import Engine",
        runtime__engine="import onnxruntime\nimport numpy\nfrom .errors import ModelError",
        export__exporter="import torch, onnx\n"
        "from ssmstream.runtime.manifest import load_manifest\n"
        "from ssmstream.runtime import Engine\n"
        "from ssmstream.model import SSMNetwork",
        protos__x_pb2_grpc="import grpc\nfrom ssmstream.protos import x_pb2",
        runtime__sampling="import torchlike_name, grpcio_free",  # dotted boundaries only
    )
    assert violations(ok) == []
