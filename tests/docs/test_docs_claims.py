"""What the README, docs/ and the .proto's comments tell a user to type or read, against the
code as it is.

tests/test_readme.py runs the README's commands and Python blocks, and
tests/test_doc_references.py holds the tests the docs cite, the guarantees page's flags and the
metrics named in full. This module holds the rest that a reader acts on: every `--flag` any
page names is an option of a command (and the scale-out page's are `ssmstream serve`'s), the
defaults the pages state are the parsers' (a flag "off by default" is off, and its --help says
so) and the clients' (`keepalive`), the variable `ssmstream generate` takes its bearer token
from is the one the README names, the `ssmstream` lines of docs/ parse, the Envoy example
routes on the header the clients send to the Service deploy/k8s defines, the state-store
metrics the scale-out page abbreviates (`…_loads_total`) are exported, the grpcurl lines name
real methods and fields, the RPCs the README lists are the service's, the Python names the
pages cite exist, every repository path and link they name is there, and the `top_k` range
the .proto states is the server's."""

from __future__ import annotations

import importlib
import re
import shlex
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from ssmstream.protos import inference_pb2
from test_readme import PARSERS  # ssmstream subcommand -> module with build_parser()

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md", "docs/guarantees.md", "docs/scaleout.md", "docs/theory.md"]
TEXT = {page: (ROOT / page).read_text() for page in PAGES}
OTHER_TOOLS = {  # flags of other programs the pages show: pip, torchrun, docker compose
    "--index-url", "--nproc-per-node", "--build",
}  # fmt: skip
SERVICE = inference_pb2.DESCRIPTOR.services_by_name["StreamingInference"]


def parser(command: str):
    return importlib.import_module(PARSERS[command]).build_parser()


def options(command: str) -> set[str]:
    return {o for a in parser(command)._actions for o in a.option_strings}


def localcluster_options() -> set[str]:
    """deploy/localcluster.py's flags (its parser is built inside main())."""
    source = (ROOT / "deploy" / "localcluster.py").read_text()
    return set(re.findall(r'add_argument\(\s*"(--[a-z-]+)"', source))


def flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def test_every_flag_the_pages_name_is_an_option():
    known = set().union(*(options(c) for c in PARSERS)) | localcluster_options() | OTHER_TOOLS
    for page, text in TEXT.items():
        assert not flags(text) - known, (page, sorted(flags(text) - known))


def test_the_scale_out_pages_flags_are_serves():
    text = TEXT["docs/scaleout.md"]
    unknown = flags(text) - options("serve") - localcluster_options() - OTHER_TOOLS
    assert not unknown, sorted(unknown)
    assert {"--state-store", "--persist-every", "--lease-ttl", "--replicas"} <= flags(text)


# "`NAME` … (default V": a few words after the name, on its line or wrapped onto the next
DEFAULT_STATED = r"`({name})`[^`(\n]{{0,12}}(?:\n\s*)?\(default `?([\w.]+)"


def stated_defaults() -> list[tuple[str, str, str]]:
    """(page, flag, value) of each "`--flag` … (default V" a page states (the words between
    them may wrap onto the next line), and the default of the --persist-every modes' table
    ("| `Nms` (default `100ms`) |")."""
    found = []
    for page, text in TEXT.items():
        for flag, value in re.findall(DEFAULT_STATED.format(name="--[a-z-]+"), text):
            found.append((page, flag, value))
        if "--persist-every" in text:
            for value in re.findall(r"\| `Nms` \(default `(\w+)`\)", text):
                found.append((page, "--persist-every", value))
    return found


def test_the_defaults_the_pages_state_are_the_serve_parsers():
    stated = stated_defaults()
    assert {f for _, f, _ in stated} >= {
        "--prefix-cache-mb", "--rewind-window", "--rewind-memory-mb", "--persist-every",
        "--keepalive", "--max-connection-idle",
    }  # fmt: skip
    defaults = {o: a.default for a in parser("serve")._actions for o in a.option_strings}
    for page, flag, value in stated:
        default = defaults[flag]
        same = str(default) == value or (
            isinstance(default, (int, float)) and float(value) == float(default)
        )
        assert same, f"{page}: {flag} (default {value}); the parser's default is {default!r}"


def test_a_flag_a_page_calls_off_by_default_is_off_and_its_help_says_so():
    said = [
        (page, flag)
        for page, text in TEXT.items()
        for flag in re.findall(r"`(--[a-z0-9-]+)` is\s+off by default", text)
    ]
    assert said
    actions = {o: a for a in parser("serve")._actions for o in a.option_strings}
    for page, flag in said:
        action = actions[flag]
        assert action.default is False, (page, flag, action.default)
        assert "default: off" in action.help, (page, flag, action.help)


def test_the_client_keepalive_the_readme_states_is_the_clients_default():
    """The README's "every `keepalive` seconds (default N" and "`keepalive_timeout` (N s)":
    the grpc options a Client and an AsyncClient made without them put on their channel."""
    from ssmstream.runtime.client import AsyncClient, Client

    text = TEXT["README.md"]
    (every,) = re.findall(DEFAULT_STATED.format(name="keepalive"), text)
    (within,) = re.findall(r"`keepalive_timeout` \((\d+) s\)", text)
    for cls in (Client, AsyncClient):
        options = dict(cls("127.0.0.1:1").options)  # no connection is made
        assert options["grpc.keepalive_time_ms"] == 1000 * int(every[1]), cls
        assert options["grpc.keepalive_timeout_ms"] == 1000 * int(within), cls


def test_the_readme_names_the_variable_generate_takes_its_token_from():
    variable = parser("generate").get_default("token_env")
    assert f"`${variable}`" in TEXT["README.md"] and "`--token-env`" in TEXT["README.md"]


def sh_lines(text: str) -> list[str]:
    """The logical command lines of each ```sh block (comments and a trailing & dropped)."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for ln in block.replace("\\\n", " ").splitlines():
            ln = re.sub(r"\s+#.*$", "", ln).strip().rstrip("&").strip()
            if ln:
                lines.append(ln)
    return lines


DOCS_COMMANDS = [
    shlex.split(ln)[1:]
    for page in PAGES
    if page.startswith("docs/")
    for ln in sh_lines(TEXT[page])
    if ln.startswith("ssmstream ")
]


def test_the_docs_show_commands():
    assert any(argv[0] == "serve" for argv in DOCS_COMMANDS)


@pytest.mark.parametrize("argv", DOCS_COMMANDS, ids=[" ".join(a)[:50] for a in DOCS_COMMANDS])
def test_each_ssmstream_line_of_the_docs_parses(argv):
    parser(argv[0]).parse_args(argv[1:])  # SystemExit (a failed test) on a bad flag or value


def test_the_envoy_example_routes_on_the_clients_header_to_the_headless_service():
    (block,) = re.findall(r"```yaml\n(.*?)```", TEXT["docs/scaleout.md"], re.S)
    envoy = yaml.safe_load(block)
    (route,) = envoy["route_config"]["virtual_hosts"][0]["routes"]
    (policy,) = route["route"]["hash_policy"]
    client = (ROOT / "runtime" / "client.py").read_text()
    assert f'("{policy["header"]["header_name"]}", session_id)' in client  # what clients send
    (cluster,) = envoy["clusters"]
    assert cluster["lb_policy"] == "RING_HASH" and route["route"]["cluster"] == cluster["name"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    address = endpoint["address"]["socket_address"]
    k8s = [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/ssmstream.yaml").read_text()) if d]
    headless = {
        d["metadata"]["name"]: d["spec"]["ports"][0]["port"]
        for d in k8s
        if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"
    }
    assert headless.get(address["address"]) == address["port_value"], (address, headless)
    assert address["port_value"] == parser("serve").get_default("port")


def test_the_state_store_metrics_the_scale_out_page_names_are_exported():
    from ssmstream.runtime.replication import StoreCollector

    class Replication:  # the counters a RedisReplication reports, all zero
        def stats(self):
            return defaultdict(int)

    exported = {m.name for m in StoreCollector(Replication()).collect()}
    (section,) = re.findall(r"## Metrics\n(.*?)\n## ", TEXT["docs/scaleout.md"], re.S)
    named = re.findall(r"`(ssmstream_\w+|…_\w+)`", section)
    assert len(named) >= 8
    for name in named:
        full = name.replace("…", "ssmstream_state_store", 1)
        assert full.removesuffix("_total") in exported, (name, sorted(exported))


def grpcurl_calls(text: str) -> list[tuple[str, str]]:
    """(method path, -d JSON) of each grpcurl line that calls a method."""
    calls = []
    for ln in sh_lines(text):
        words = shlex.split(ln)
        if words[0] == "grpcurl" and "/" in words[-1]:
            data = words[words.index("-d") + 1] if "-d" in words else "{}"
            calls.append((words[-1], data))
    return calls


def test_the_grpcurl_lines_call_real_methods_with_real_fields():
    calls = grpcurl_calls(TEXT["README.md"])
    assert len(calls) >= 2
    for path, data in calls:
        service, _, method = path.rpartition("/")
        assert service == SERVICE.full_name, path
        m = SERVICE.methods_by_name[method]  # KeyError: no such method
        cls = getattr(inference_pb2, m.input_type.name)
        json_format.Parse(data.replace("…", "x"), cls())  # ParseError: a field it lacks


def test_the_rpcs_the_readme_lists_are_the_service():
    (item,) = [p for p in TEXT["README.md"].split("\n- ") if p.startswith("Service `")]
    listed = set(re.findall(r"`([A-Z][A-Za-z]+)`", item.split("Also ")[0]))
    assert listed == {m.name for m in SERVICE.methods}
    for page, text in TEXT.items():
        for n in re.findall(r"\ball (\d+) RPCs\b", text):
            assert int(n) == len(SERVICE.methods), page


def cited_names() -> list[tuple[str, str]]:
    """(page, `Head.attr`) of each backticked dotted name whose head is a class or module of
    the project (the heads below)."""
    heads = "|".join(HEADS)
    return [
        (page, name)
        for page, text in TEXT.items()
        for name in re.findall(rf"`((?:{heads})\.\w+)", text)
    ]


HEADS = {
    "ssm": "ssmstream.model.ssm",
    "SSM": "ssmstream.model.layers:SSM",
    "SSMNetwork": "ssmstream.model.network:SSMNetwork",
    "SSMConfig": "ssmstream.model.network:SSMConfig",
    "Engine": "ssmstream.runtime.engine:Engine",
    "ClientSession": "ssmstream.runtime.client:ClientSession",
    "AsyncClientSession": "ssmstream.runtime.client:AsyncClientSession",
    "Session": "proto:Session",
    "Snapshot": "proto:Snapshot",
    "SnapshotSession": "rpc:SnapshotSession",
    "limits": "proto:Limits",
}


def has(head: str, attr: str) -> bool:
    where = HEADS[head]
    if where.startswith("proto:"):
        return attr in getattr(inference_pb2, where[6:]).DESCRIPTOR.fields_by_name
    if where.startswith("rpc:"):
        output = SERVICE.methods_by_name[where[4:]].output_type
        return attr in output.fields_by_name
    module, _, name = where.partition(":")
    obj = importlib.import_module(module)
    obj = getattr(obj, name) if name else obj
    if hasattr(obj, attr):
        return True
    if name == "SSM":  # parameters are set in __init__
        return attr in dict(obj(d_model=2, d_state=2).named_parameters())
    return False


def test_the_python_names_the_pages_cite_exist():
    cited = cited_names()
    assert len(cited) >= 20
    missing = [(page, name) for page, name in cited if not has(*name.split("."))]
    assert not missing, missing


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, blanks -)."""
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", text, re.M)
    }


def test_every_repository_path_and_link_the_pages_name_exists():
    tops = {p.name for p in ROOT.iterdir()} - {".demo", ".venv"}
    named = []
    for page, text in TEXT.items():
        for span in re.findall(r"`([^`\s]+)`", text):
            path = span.split("::")[0].rstrip(",.:")
            if path.split("/")[0] in tops and "/" in path and not {"…", "<", "*"} & set(path):
                named.append((page, path, ""))
        for link in re.findall(r"\]\(([^)\s]+)\)", text):  # relative to the page
            path, _, anchor = link.partition("#")
            if "://" not in path:
                target = (ROOT / page).parent / path if path else ROOT / page
                named.append((page, target.resolve().relative_to(ROOT).as_posix(), anchor))
    assert len(named) >= 30 and any(anchor for _, _, anchor in named)
    missing = [(page, p) for page, p, _ in named if not (ROOT / p).exists()]
    assert not missing, missing
    for page, path, anchor in named:
        if anchor:
            assert anchor in anchors((ROOT / path).read_text()), (page, f"{path}#{anchor}")


def test_the_top_k_range_the_proto_states_is_the_one_the_server_takes():
    """A token model may rank fewer outputs than its vocabulary (SSMConfig(d_output=…))."""
    from ssmstream.runtime.errors import InvalidInput
    from ssmstream.runtime.servicer import check_output_selection

    proto = (ROOT / "protos" / "inference.proto").read_text()
    (bound,) = re.findall(r"With OUTPUT_TOP_K: how many tokens, 1\.\.(\w+)\.", proto)
    info = {"input_kind": "tokens", "vocab_size": 12, "d_output": 10}
    top = info[bound]
    check_output_selection(
        inference_pb2.StepRequest(output=inference_pb2.OUTPUT_TOP_K, top_k=top), info
    )
    with pytest.raises(InvalidInput, match="top_k"):
        check_output_selection(
            inference_pb2.StepRequest(output=inference_pb2.OUTPUT_TOP_K, top_k=top + 1), info
        )
