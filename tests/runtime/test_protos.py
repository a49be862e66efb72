"""The committed stubs are what protoc makes of protos/inference.proto today, and they
import as `ssmstream.protos` with the service and fields DESIGN.md names."""

from __future__ import annotations

from pathlib import Path

import pytest
from ssmstream.protos import generate

pytest.importorskip("grpc_tools")


def test_committed_stubs_are_fresh(tmp_path: Path):
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(generate.generated_names())
    stale = [
        p.name for p in written if p.read_bytes() != (generate.PROTO_DIR / p.name).read_bytes()
    ]
    assert not stale, (
        f"protos/{stale} differ from what protoc generates from protos/inference.proto: "
        "run `make protos` and commit the result (same grpcio-tools version as the header)"
    )


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
