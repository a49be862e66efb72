"""Suite-wide settings.

torch's intra-op threads spin-wait on the tiny tensors of these tests; on the 2-core CI machine
one thread is several times faster overall, so the suite pins torch to one thread, and its
child processes (commands, scripts, the README's blocks, the demo) start with OMP_NUM_THREADS=1
unless the environment sets it.

The tests that stop a command with Ctrl-C (SIGINT) or a closed terminal (SIGHUP) send those
signals to child processes, which inherit an ignored signal: a suite started in the background
(`cmd &`, where the shell ignores SIGINT) or under nohup (SIGHUP) would see them ignored. The
suite starts its children with both signals as a terminal leaves them.

A test that leaves a signal handler of its own (or of a script's `main` it ran in-process)
changes how the rest of the run stops: a SIGTERM from `timeout` or a cancelled CI job became a
SystemExit raised wherever the suite happened to be. Each test must leave SIGTERM, SIGINT and
SIGHUP as it found them.

`readme_tour` runs the README's run block (export, info and verify of the shipped checkpoint)
once per run, in this process; `shipped_export` is its model directory, which the README's,
the demo's and the edge example's tests share instead of each exporting that checkpoint
(~30 s an export).

`graphs_without_torch` stands a one-node graph in for each torch → ONNX conversion (seconds
each): for tests of what an export or a benchmark does around its graphs (manifests, caches,
renames), not of the graphs.
"""

import importlib.util
import logging
import os
import signal

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch's threads in the suite's children
if importlib.util.find_spec("torch") is not None:
    import torch

    torch.set_num_threads(1)

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@pytest.fixture(autouse=True)
def _signal_handlers_left_as_found():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    yield
    left = {s.name: h for s, h in before.items() if signal.getsignal(s) is not h}
    for s in STOP_SIGNALS:
        signal.signal(s, before[s])  # the next tests run as if it had
    assert not left, f"the test left its own handlers of {sorted(left)}"


@pytest.fixture(autouse=True)
def _log_levels_left_as_found():
    """A command's main run in-process sets the levels it runs at (`export -q`: the
    ssmstream logger at WARNING): the next tests see the levels they would alone."""
    loggers = [logging.getLogger(), logging.getLogger("ssmstream")]
    before = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, before):
        lg.setLevel(level)


@pytest.fixture(scope="session")
def readme_tour(tmp_path_factory):
    """(model directory, [(command line, its result)]) of the README's run block, run as
    written but for the model directory (tests/readme_tour.py)."""
    from readme_tour import run_tour

    model = tmp_path_factory.mktemp("tour") / "ssm-model"
    return model, run_tour(model)


@pytest.fixture(scope="session")
def shipped_export(readme_tour):
    """The shipped checkpoint's export as the README's tour makes it (read-only: copy it to
    change it)."""
    model, done = readme_tour
    if any(r.returncode != 0 for _, r in done):
        pytest.fail("the README tour's export failed (see test_readme_run_block_runs)")
    return model


@pytest.fixture
def graphs_without_torch(monkeypatch):
    """export_network writes a one-node graph in place of each converted one (and keeps it
    out of this process's conversion cache): for tests of what happens around the graphs."""
    import onnx
    from ssmstream.export import exporter

    h = onnx.helper

    def one_node(*args, **kwargs) -> onnx.ModelProto:
        x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        graph = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        return h.make_model(graph, opset_imports=[h.make_opsetid("", 20)])

    monkeypatch.setattr(exporter, "_CONVERTED", type(exporter._CONVERTED)())
    monkeypatch.setattr(exporter, "torch_to_onnx", one_node)
    monkeypatch.setattr(exporter, "slim", lambda m: m)
