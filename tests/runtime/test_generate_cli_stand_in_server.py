"""`ssmstream generate` against a stand-in server: a text prompt for a model whose vocabulary
cannot hold every byte (255 tokens: byte 255 has no id) and a values model are refused before
any Generate; with --ids each token is one line and nothing follows the last; without
--max-new-tokens a server allowing more than the default still gets the default."""

from __future__ import annotations

import pytest
from ssmstream.protos import inference_pb2 as pb
from ssmstream.runtime import generate
from ssmstream.runtime.client import Client


class _InfoOnly:
    def __init__(self, info: pb.ModelInfo):
        self.info = info

    def GetModelInfo(self, request, **kw):
        return self.info


class _Generating(_InfoOnly):
    def Generate(self, request, **kw):
        self.request = request
        return _Call(pb.GenerateResponse(token=t, position=i + 2) for i, t in enumerate([5, 7]))


class _Call:
    def __init__(self, responses):
        self.responses = responses

    def __iter__(self):
        return self.responses

    def cancel(self):
        return True


def _serving(monkeypatch, stub) -> None:
    def connect(a, parser, **kw):
        c = Client("127.0.0.1:1")
        c.stub = stub
        return c

    monkeypatch.setattr(generate, "connect", connect)


@pytest.mark.parametrize(
    "info, said",
    [
        (
            pb.ModelInfo(input_kind="tokens", vocab_size=255, d_output=255),
            "this model is not byte-level: pass token ids with --ids",
        ),
        (
            pb.ModelInfo(input_kind="values", vocab_size=0, d_output=4),
            "this model takes values: Generate needs a token model (use Step)",
        ),
    ],
    ids=["255-tokens", "values"],
)
def test_a_model_that_cannot_take_text_is_a_usage_error(monkeypatch, capsys, info, said):
    _serving(monkeypatch, _InfoOnly(info))
    with pytest.raises(SystemExit) as e:
        generate.main(["hi", "--server", "127.0.0.1:1"])
    assert e.value.code == 2
    assert f"ssmstream generate: error: {said}" in capsys.readouterr().err


def test_ids_are_one_a_line_with_nothing_after_the_last(monkeypatch, capsys):
    limits = pb.Limits(max_tokens_per_request=8, max_new_tokens=64)
    info = pb.ModelInfo(input_kind="tokens", vocab_size=10, d_output=10, limits=limits)
    _serving(monkeypatch, _Generating(info))
    assert generate.main(["1", "--ids", "--server", "127.0.0.1:1", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr() == ("5\n7\n", "")


def test_the_default_new_tokens_stay_200_under_a_higher_server_limit(monkeypatch, capsys):
    limits = pb.Limits(max_tokens_per_request=8, max_new_tokens=1000)
    stub = _Generating(pb.ModelInfo(input_kind="tokens", vocab_size=10, d_output=10, limits=limits))
    _serving(monkeypatch, stub)
    assert generate.main(["1", "--ids", "--server", "127.0.0.1:1"]) == 0
    assert stub.request.max_new_tokens == 200
