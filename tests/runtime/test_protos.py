"""The committed stubs are what protoc makes of protos/inference.proto today, and they
import as `ssmstream.protos` with the service and fields DESIGN.md names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ssmstream.protos import generate

pytest.importorskip("grpc_tools")

ROOT = Path(__file__).resolve().parents[2]
# the version stamps of the generator that ran: the oldest grpcio / protobuf runtime the stubs
# accept at import. A newer grpcio-tools writes its own version there and nothing else
# changes, so freshness is checked without them, and the committed stamps against the
# floors pyproject.toml declares.
GRPC_STAMP = re.compile(rb"^GRPC_GENERATED_VERSION = '([0-9.]+)'$", re.M)
PROTOBUF_STAMP = re.compile(
    rb"^# Protobuf Python Version: ([0-9.]+)$|"
    rb"ValidateProtobufRuntimeVersion\(\n\s+_runtime_version\.Domain\.PUBLIC,\n"
    rb"\s+(\d+),\n\s+(\d+),\n\s+(\d+),",
    re.M,
)


def _unstamped(data: bytes) -> bytes:
    data = GRPC_STAMP.sub(b"GRPC_GENERATED_VERSION = ...", data)
    return PROTOBUF_STAMP.sub(b"<protobuf version>", data)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def _floor(package: str) -> tuple[int, ...]:
    """The `>=` floor of a runtime dependency in pyproject.toml."""
    m = re.search(rf'"{package}>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, f"pyproject.toml: no {package}>= floor"
    return _version(m.group(1))


def test_committed_stubs_are_fresh(tmp_path: Path):
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(generate.generated_names())
    stale = [
        p.name
        for p in written
        if _unstamped(p.read_bytes()) != _unstamped((generate.PROTO_DIR / p.name).read_bytes())
    ]
    assert not stale, (
        f"protos/{stale} differ from what protoc generates from protos/inference.proto: "
        "run `make protos` and commit the result"
    )


def test_the_stubs_accept_the_runtime_floors_pyproject_declares():
    """A user with exactly `grpcio` / `protobuf` at pyproject's floor can import the stubs
    (they refuse an older runtime than their generator's stamp)."""
    grpc_stub = (generate.PROTO_DIR / "inference_pb2_grpc.py").read_bytes()
    (grpc_stamp,) = GRPC_STAMP.findall(grpc_stub)
    assert _version(grpc_stamp.decode()) <= _floor("grpcio")
    # the dev extra pins the generator that stamped them, so `make protos` gives them back
    pin = re.search(r'"grpcio-tools==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and pin[1] == grpc_stamp.decode(), pin
    pb2 = (generate.PROTO_DIR / "inference_pb2.py").read_bytes()
    stamps = PROTOBUF_STAMP.findall(pb2)
    comment = next(s[0] for s in stamps if s[0])
    call = next(s[1:] for s in stamps if s[1])
    assert _version(comment.decode()) == tuple(int(x) for x in call)
    assert _version(comment.decode()) <= _floor("protobuf")


def test_a_generator_version_is_all_the_stamps_hide():
    """The normalisation hides the stamps and nothing else: a changed stub still differs."""
    stub = (generate.PROTO_DIR / "inference_pb2_grpc.py").read_bytes()
    restamped = GRPC_STAMP.sub(b"GRPC_GENERATED_VERSION = '99.0.0'", stub)
    assert restamped != stub and _unstamped(restamped) == _unstamped(stub)
    assert _unstamped(stub.replace(b"StreamingInference", b"Streaming", 1)) != _unstamped(stub)
    pb2 = (generate.PROTO_DIR / "inference_pb2.py").read_bytes()
    assert _unstamped(pb2).count(b"<protobuf version>") == 2


def test_stubs_import_through_package_mapping():
    from ssmstream.protos import inference_pb2 as pb
    from ssmstream.protos import inference_pb2_grpc as pb_grpc

    service = pb.DESCRIPTOR.services_by_name["StreamingInference"]
    assert service.full_name == "ssmstream.v1.StreamingInference"
    assert {m.name for m in service.methods} == {
        "GetModelInfo",
        "CreateSession",
        "CloseSession",
        "Step",
        "Stream",
        "Generate",
        "SnapshotSession",
        "RestoreSession",
        "ForkSession",
        "RewindSession",
    }
    stream = service.methods_by_name["Stream"]
    assert stream.client_streaming and stream.server_streaming
    generate_rpc = service.methods_by_name["Generate"]
    assert generate_rpc.server_streaming and not generate_rpc.client_streaming
    assert hasattr(pb_grpc, "StreamingInferenceStub")
    assert hasattr(pb_grpc, "add_StreamingInferenceServicer_to_server")
    # DESIGN.md field names are the contract
    assert {"session_id", "tokens", "values", "output", "top_k"} <= set(
        pb.StepRequest.DESCRIPTOR.fields_by_name
    )
    assert {"session_id", "position", "outputs"} <= set(pb.StepResponse.DESCRIPTOR.fields_by_name)
    # output selection: LAST is the default (enum value 0)
    assert pb.StepRequest().output == pb.OUTPUT_LAST == 0
    assert pb.StepRequest(output=pb.OUTPUT_TOP_K, top_k=5).top_k == 5


def test_round_trip_of_a_step_request():
    from ssmstream.protos import inference_pb2 as pb

    req = pb.StepRequest(session_id="s-1", tokens=[1, 2**62, 0], output=pb.OUTPUT_ALL)
    back = pb.StepRequest.FromString(req.SerializeToString())
    assert list(back.tokens) == [1, 2**62, 0] and back.session_id == "s-1"
    assert back.output == pb.OUTPUT_ALL
