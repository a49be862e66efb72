"""A client that stops reading a Stream's responses and then cancels: when the server's
blocked send fails before grpc has seen the cancel (a race), grpc logs an ERROR with a
traceback ("ExecuteBatchError raised in core by servicer method"). Any client can cause one
at will, so a server says it at DEBUG, without the traceback (the call ends as a cancel
does). grpc's other records pass as they are."""

from __future__ import annotations

import logging

import pytest
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.server import Server

GRPC = logging.getLogger("grpc._cython.cygrpc")
GONE = "ExecuteBatchError raised in core by servicer method [/ssmstream.v1.Inference/Stream]"


def _raised() -> tuple:
    try:
        raise RuntimeError('Failed "execute_batch"')
    except RuntimeError as e:
        return (type(e), e, e.__traceback__)


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_a_send_to_a_gone_client_is_no_error(toy_token_model, caplog, level):
    Server(ServerConfig(model_dir=str(toy_token_model["model_dir"]), port=0))  # installs it
    caplog.set_level(level, logger=GRPC.name)
    GRPC.error(GONE, exc_info=_raised())
    GRPC.error("something else went wrong", exc_info=_raised())
    said = [(r.levelno, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    gone = [(logging.DEBUG, GONE, False)] if level == logging.DEBUG else []
    assert said == [*gone, (logging.ERROR, "something else went wrong", True)]
