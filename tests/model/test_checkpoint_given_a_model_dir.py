"""A checkpoint reader given an exported model's directory (manifest.json, no config.json)
says so, so `ssmstream plot` / `export` / `train --resume` users see they passed the export's
output instead of its input; any other directory without config.json gets the plain error."""

from __future__ import annotations

import pytest
from ssmstream.model import load_checkpoint
from ssmstream.model.checkpoint import CheckpointError


@pytest.mark.parametrize("exported", [True, False])
def test_a_directory_without_config_json_says_whether_it_is_an_exported_model(tmp_path, exported):
    if exported:
        (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    plain = f"{tmp_path / 'config.json'} is missing: not an ssmstream checkpoint directory"
    hint = " (it holds an exported model; give the checkpoint it came from)"
    assert str(e.value) == plain + (hint if exported else "")
