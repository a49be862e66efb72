"""an fp16 export refuses input values beyond float16's range (they would be inf
inside the graph and poison the state) instead of running them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ssmstream.runtime.engine import Engine
from ssmstream.runtime.errors import InvalidInput


@pytest.fixture(scope="module")
def fp16_values_engine(make_toy, tmp_path_factory):
    toy = make_toy(tmp_path_factory.mktemp("toy_fp16_values"), "values")
    path = toy["model_dir"] / "manifest.json"
    m = json.loads(path.read_text())
    m["dtype"] = "fp16"
    path.write_text(json.dumps(m))
    return toy, Engine(toy["model_dir"], device="cpu", threads=1)


def test_values_beyond_float16_are_refused_and_the_largest_one_is_not(fp16_values_engine):
    toy, eng = fp16_values_engine
    S, d_in = toy["S"], toy["d_in"]
    s = np.zeros((1, S), np.float32)
    ok = np.full((1, d_in), 65504.0, np.float32)
    eng.step(ok, s)  # float16's largest finite value: accepted
    for bad in (70000.0, -1e6):
        x = np.zeros((1, d_in), np.float32)
        x[0, 1] = bad
        with pytest.raises(InvalidInput, match="overflow this fp16 export's inputs"):
            eng.step(x, s)
        with pytest.raises(InvalidInput, match="overflow this fp16 export's inputs"):
            eng.prefill(np.repeat(x[:, None], 4, axis=1), s)
