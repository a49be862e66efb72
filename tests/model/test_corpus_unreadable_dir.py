"""A directory under --data that cannot be listed (permissions) is an error naming it: the walk
skipped it without a word, so the corpus was silently smaller (and its train/val split another),
or an unreadable --data directory itself read as "empty corpus". Permissions do not stop root,
so the listing is made to fail the way a directory without read permission does."""

from __future__ import annotations

import os

import pytest
from ssmstream.model.data import find_files, load_text
from ssmstream.model.train import main


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """corpus/a.txt and corpus/locked/b.txt, where listing `locked` fails with EACCES."""
    root = tmp_path / "corpus"
    (root / "locked").mkdir(parents=True)
    (root / "a.txt").write_text("hello there, general kenobi. " * 40)
    (root / "locked" / "b.txt").write_text("you are a bold one. " * 40)
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return root


def test_an_unreadable_subdirectory_is_named_not_skipped(corpus):
    with pytest.raises(
        ValueError,
        match=f"^data: cannot read the directory {corpus / 'locked'}: Permission denied$",
    ):
        find_files([corpus])
    with pytest.raises(ValueError, match="cannot read the directory"):
        load_text([corpus], min_bytes=17)


def test_an_unreadable_data_directory_is_named_not_an_empty_corpus(corpus):
    with pytest.raises(ValueError, match=f"^data: cannot read the directory {corpus / 'locked'}:"):
        find_files([corpus / "locked"])


def test_cli_says_it_in_one_line_and_makes_no_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["--data", str(corpus), "--out", str(out), "--no-progress", "--seq-len", "16"]
    argv += ["--steps", "1", "--warmup-steps", "0", "--d-model", "2", "--n-layers", "1"]
    argv += ["--d-state", "2", "--batch-size", "1", "--eval-batches", "1"]  # if it trained
    assert main(argv) == 2
    said = capsys.readouterr().err
    assert said == (
        f"ssmstream train: error: --data: cannot read the directory {corpus / 'locked'}: "
        "Permission denied\n"
    )
    assert not out.exists()
