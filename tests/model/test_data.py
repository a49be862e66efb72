"""model/data.py: the byte corpus split and windows, and the continuous signal task.

Signal targets are checked against independent computations: the low-pass against a
fine-grid RK4 integration of y' = (u − y)/τ, the delay and look-ahead against shifted
samples of the same signal drawn at a rate where the shift is a whole number of samples.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from ssmstream.model import data as data_mod
from ssmstream.model.data import (
    SignalConfig,
    default_corpus_dir,
    find_files,
    load_text,
    signal_batch,
    text_batch,
)


@pytest.fixture
def corpus(tmp_path):
    """200 small text files in nested directories (+ a hidden file and a __pycache__)."""
    root = tmp_path / "corpus"
    for i in range(200):
        f = root / f"d{i % 7}" / f"file{i:03d}.txt"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"file {i}: " + "abcdefghij"[i % 10] * (50 + i))
    (root / ".hidden").write_text("secret")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.txt").write_text("cache")
    return root


def test_split_is_deterministic_disjoint_and_complete(corpus, tmp_path):
    a, b = load_text([corpus], val_fraction=0.2), load_text([corpus], val_fraction=0.2)
    assert a.train_files == b.train_files and a.val_files == b.val_files
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    keys = {key for _, key in find_files([corpus])}
    assert len(keys) == 200  # hidden file and __pycache__ skipped
    assert set(a.train_files).isdisjoint(a.val_files)
    assert set(a.train_files) | set(a.val_files) == keys
    # binomial(200, 0.2): mean 40, sd ≈ 5.7 → a generous 4-sd window
    assert 17 <= len(a.val_files) <= 63
    # the bytes are exactly those of the files of each side
    total = sum(f.stat().st_size for f, _ in find_files([corpus]))
    assert a.train.numel() + a.val.numel() == total
    val_bytes = bytes(a.val.tolist())
    for key in a.val_files[:5]:
        assert (corpus.parent / key).read_bytes() in val_bytes
    # the split depends on paths relative to the corpus root, not where it lives
    moved = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(corpus, moved)
    c = load_text([moved], val_fraction=0.2)
    assert c.val_files == a.val_files and torch.equal(c.val, a.val)


def test_single_file_is_split_by_bytes(tmp_path):
    f = tmp_path / "one.txt"
    data = bytes(range(256)) * 40
    f.write_bytes(data)
    d = load_text([f], val_fraction=0.1, min_bytes=65)
    assert bytes(d.train.tolist()) + bytes(d.val.tolist()) == data
    assert d.val.numel() == int(len(data) * 0.1)


def test_default_corpus_is_the_stdlib():
    files = {key for _, key in find_files([default_corpus_dir()], "*.py")}
    root = default_corpus_dir().name
    assert f"{root}/os.py" in files and f"{root}/json/decoder.py" in files
    assert not any("site-packages" in k or "__pycache__" in k for k in files)


def test_text_batch_windows_are_contiguous(corpus):
    d = load_text([corpus], val_fraction=0.2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x, y = text_batch(d.train, 8, 32, g1)
    x2, y2 = text_batch(d.train, 8, 32, g2)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    train_bytes = bytes(d.train.tolist())
    for row_x, row_y in zip(x, y):
        assert bytes(row_x.tolist()) + bytes(row_y[-1:].tolist()) in train_bytes


def test_a_file_named_twice_is_in_the_corpus_once_under_its_directorys_key(tmp_path):
    """A file given both inside its directory and on its own (absolute, or ./relative) is
    read once, with the key the directory gives it: under two keys it would be hashed twice
    and could land in both splits."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"f{i}.py").write_text(f"x = {i}\n" * 10)
    plain = find_files([corpus])
    for extra in (corpus / "f3.py", Path(os.path.relpath(corpus / "f3.py"))):
        assert find_files([corpus, extra]) == plain
        assert find_files([extra, corpus]) == plain
    assert find_files([corpus, corpus]) == plain
    d = load_text([corpus, corpus / "f3.py"], val_fraction=0.5)
    assert sorted(d.train_files + d.val_files) == sorted(k for _, k in plain)


def test_keys_do_not_depend_on_how_the_directory_is_named_or_listed(tmp_path, monkeypatch, caplog):
    """`--data .` keys files as naming the folder does (it gave '/a.txt'); a file found under
    two names takes the smaller key whatever order the directory lists (the split is the same
    on every machine); a file name that is not UTF-8 is split like any other (its key hashes
    as its bytes; it had stopped the whole corpus); a symlinked directory is logged."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt"):
        (corpus / name).write_text(f"{name}\n" * 20)
    (corpus / "z.txt").symlink_to(corpus / "a.txt")
    (corpus / os.fsdecode(b"caf\xe9.txt")).write_text("latin-1 name\n" * 20)
    (tmp_path / "elsewhere").mkdir()
    (corpus / "linked").symlink_to(tmp_path / "elsewhere")
    named = find_files([corpus])
    assert [k for _, k in named] == ["corpus/a.txt", "corpus/b.txt", "corpus/caf\udce9.txt"]
    monkeypatch.chdir(corpus)
    assert [k for _, k in find_files(["."])] == [k for _, k in named]
    walk = os.walk
    monkeypatch.setattr(os, "walk", lambda p, **kw: ((r, d, n[::-1]) for r, d, n in walk(p, **kw)))
    assert [k for _, k in find_files(["."])] == [k for _, k in named]  # listed the other way
    with caplog.at_level("INFO", logger="ssmstream.model.data"):
        d = load_text([corpus], val_fraction=0.5)
    assert sorted(d.train_files + d.val_files) == [k for _, k in named]
    assert "linked is a symlinked directory, not followed" in caplog.text


def test_two_directories_of_one_name_are_refused_naming_both(tmp_path):
    for side in ("a", "b"):
        (tmp_path / side / "data").mkdir(parents=True)
        (tmp_path / side / "data" / "x.txt").write_text(f"from {side}\n")
    with pytest.raises(ValueError, match=r"a/data/x.txt.*b/data/x.txt.*same key 'data/x.txt'"):
        find_files([tmp_path / "a" / "data", tmp_path / "b" / "data"])
    assert len(find_files([tmp_path / "a", tmp_path / "b"])) == 2  # the parents are distinct


def test_text_errors(tmp_path, corpus):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "zero.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty corpus"):
        load_text([tmp_path / "empty"])
    with pytest.raises(ValueError, match="empty corpus"):
        load_text([corpus], glob="*.nothing")
    with pytest.raises(ValueError, match="does-not-exist' does not exist$"):
        load_text([tmp_path / "does-not-exist"])
    # it exists, but is not what a corpus is made of: not said to be missing
    with pytest.raises(ValueError, match="^data: '/dev/null' is not a regular file or a dir"):
        load_text(["/dev/null"])
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match=r"dangling' is a link to '.*gone', which does not exist$"):
        load_text([tmp_path / "dangling"])
    (tmp_path / "to-null").symlink_to("/dev/null")  # it exists: not said to be missing
    with pytest.raises(ValueError, match="to-null' is not a regular file or a directory$"):
        load_text([tmp_path / "to-null"])
    with pytest.raises(ValueError, match="val_fraction"):
        load_text([corpus], val_fraction=0.0)
    with pytest.raises(ValueError, match="too small"):
        load_text([corpus], min_bytes=10**7)
    d = load_text([corpus])
    with pytest.raises(ValueError, match="seq_len"):
        text_batch(d.val, 2, d.val.numel(), torch.Generator())
    with pytest.raises(ValueError, match="split"):
        d.split("test")


# --- signals -----------------------------------------------------------------------------


def _same_signal_at(cfg: SignalConfig, rate: float, seed: int, batch: int = 4):
    return signal_batch(
        dataclasses.replace(cfg, rate=rate), batch, torch.Generator().manual_seed(seed)
    )


def test_signal_is_rate_independent():
    cfg = SignalConfig(rate=8, duration=16)
    u1, y1 = _same_signal_at(cfg, 8, seed=5)
    u2, y2 = _same_signal_at(cfg, 16, seed=5)
    assert u1.shape == (4, 128, 1) and u2.shape == (4, 256, 1)
    torch.testing.assert_close(u2[:, ::2], u1, rtol=0, atol=1e-6)
    torch.testing.assert_close(y2[:, ::2], y1, rtol=0, atol=1e-6)
    assert u1.dtype == torch.float32 and u1.std() > 0.1


def test_lowpass_target_matches_ode_integration():
    """y' = (u − y)/τ, y(0) = 0, integrated by RK4 on a 64× finer grid of the same signal."""
    cfg = SignalConfig(rate=4, duration=12, target="lowpass", tau=0.7)
    fine = 64
    u_fine, _ = _same_signal_at(cfg, cfg.rate * fine, seed=9)
    u_fine = u_fine[..., 0].double()  # [B, L·fine], exact samples at t = i / (fine·rate)
    # RK4 with step 2h needs u at the half step: use step h2 = 2/(fine·rate) on even samples
    h = 2 / (cfg.rate * fine)
    y = torch.zeros(u_fine.shape[0], dtype=torch.float64)
    ys = [y]
    f = lambda u, y: (u - y) / cfg.tau  # noqa: E731
    for i in range(0, u_fine.shape[1] - 2, 2):
        u0, um, u1 = u_fine[:, i], u_fine[:, i + 1], u_fine[:, i + 2]
        k1 = f(u0, y)
        k2 = f(um, y + h / 2 * k1)
        k3 = f(um, y + h / 2 * k2)
        k4 = f(u1, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        ys.append(y)
    y_ode = torch.stack(ys, 1)[:, :: fine // 2]  # [B, L] at the coarse sample times
    _, y_target = _same_signal_at(cfg, cfg.rate, seed=9)
    torch.testing.assert_close(y_target[..., 0].double(), y_ode, rtol=0, atol=1e-6)


def test_delay_and_next_targets_are_shifted_samples():
    cfg = SignalConfig(rate=8, duration=8, target="delay", tau=0.5)  # 4 samples
    u, y = _same_signal_at(cfg, 8, seed=2)
    torch.testing.assert_close(y[:, 4:], u[:, :-4], rtol=0, atol=1e-6)
    assert torch.all(y[:, :4] == 0)
    nxt = dataclasses.replace(cfg, target="next")  # default horizon: one sample
    u, y = _same_signal_at(nxt, 8, seed=2)
    torch.testing.assert_close(y[:, :-1], u[:, 1:], rtol=0, atol=1e-6)
    far = dataclasses.replace(cfg, target="next", horizon=0.25)  # 2 samples at rate 8
    u, y = _same_signal_at(far, 8, seed=2)
    torch.testing.assert_close(y[:, :-2], u[:, 2:], rtol=0, atol=1e-6)


def test_lowpass_gain_of_a_slow_sinusoid():
    """A single slow sinusoid passes with gain 1/√(1+(ωτ)²) once the transient is gone."""
    cfg = SignalConfig(rate=32, duration=40, n_components=1, freq_min=0.1, freq_max=0.1, tau=0.5)
    u, y = signal_batch(cfg, 3, torch.Generator().manual_seed(0))
    late = slice(20 * 32, None)  # 40 time constants later
    w = 2 * math.pi * 0.1
    ratio = y[:, late].pow(2).mean(1).sqrt() / u[:, late].pow(2).mean(1).sqrt()
    torch.testing.assert_close(
        ratio.squeeze(-1), torch.full((3,), 1 / math.sqrt(1 + (w * 0.5) ** 2)), rtol=2e-3, atol=0
    )


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rate": 0}, "rate"),
        ({"duration": -1}, "duration"),
        ({"tau": 0}, "tau"),
        ({"n_components": 0}, "n_components"),
        ({"freq_min": 2.0, "freq_max": 1.0}, "freq_min"),
        ({"rate": 2, "freq_max": 1.0}, "Nyquist"),
        ({"target": "square"}, "target"),
        ({"horizon": -0.1}, "horizon"),
    ],
)
def test_signal_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SignalConfig(**kwargs)


def test_byte_split_gives_val_at_least_min_bytes(tmp_path):
    f = tmp_path / "one.txt"
    f.write_bytes(bytes(range(100)))  # 5% would be 5 bytes; min_bytes asks for 20
    d = load_text([f], val_fraction=0.05, min_bytes=20)
    assert bytes(d.val.tolist()) == bytes(range(80, 100))
    assert bytes(d.train.tolist()) == bytes(range(80))


def test_empty_files_are_not_listed_in_a_split(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(40):
        (root / f"f{i:02d}.txt").write_text(f"file {i}\n" * 20)
    (root / "empty.txt").write_bytes(b"")
    d = load_text([root], val_fraction=0.3)
    assert "c/empty.txt" not in d.train_files + d.val_files
    assert len(d.train_files) + len(d.val_files) == 40


def test_text_batch_with_data_exactly_one_window_long():
    data = torch.arange(9, dtype=torch.uint8)
    x, y = text_batch(data, 3, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.arange(8).expand(3, 8)) and torch.equal(
        y, torch.arange(1, 9).expand(3, 8)
    )


def test_text_batch_can_start_at_the_last_window():
    data = torch.arange(12, dtype=torch.uint8)  # windows of 9 bytes start at 0..3
    x, _ = text_batch(data, 400, 8, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1, 2, 3}


def test_val_fraction_one_is_refused_naming_it(tmp_path):
    f = tmp_path / "one.txt"
    f.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        load_text([f], val_fraction=1.0)


def test_signal_config_with_no_samples_is_refused():
    with pytest.raises(ValueError, match="duration · rate must give at least one sample, got 0"):
        SignalConfig(rate=4.0, duration=0.1, freq_min=0.5, freq_max=1.0)


def test_signal_config_with_infinite_length_is_refused():
    with pytest.raises(ValueError, match="duration · rate must be finite"):
        SignalConfig(rate=1e300, duration=1e300)


def test_default_corpus_takes_only_py_files(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    for i in range(30):
        (tmp_path / "lib" / f"m{i}.py").write_text(f"x = {i}\n" * 10)
        (tmp_path / "lib" / f"n{i}.txt").write_text("not python\n" * 10)
    monkeypatch.setattr(data_mod, "default_corpus_dir", lambda: tmp_path / "lib")
    d = load_text(None, val_fraction=0.3)
    keys = d.train_files + d.val_files
    assert len(keys) == 30 and all(k.endswith(".py") for k in keys)


def test_single_file_byte_split_names_the_file_as_train(tmp_path):
    files = []
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        f = tmp_path / name
        f.write_bytes(b"x" * 200)
        d = load_text([f], val_fraction=0.1, min_bytes=20)
        files.append((d.train_files, d.val_files))
    # whichever side the file's hash picked, the bytes split puts its key in train
    assert files == [
        ([p], ["<tail of the corpus>"])
        for p in (str(tmp_path / n) for n in ("a.txt", "b.txt", "c.txt", "d.txt"))
    ]


@pytest.mark.parametrize("name", ["rate", "duration", "tau"])
def test_signal_config_refuses_infinite_values_naming_them(name):
    with pytest.raises(ValueError, match=f"{name} must be positive and finite, got inf"):
        SignalConfig(**{name: math.inf})


def test_signal_power_is_one_half_whatever_the_number_of_components():
    for K in (1, 4, 9):
        cfg = SignalConfig(n_components=K, duration=64.0)
        u, _ = signal_batch(cfg, 512, torch.Generator().manual_seed(K))
        assert u.double().pow(2).mean().item() == pytest.approx(0.5, rel=0.08), K


def test_named_file_takes_its_directorys_key_not_its_path(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.py").write_text("a\n")
    (root / "b.txt").write_text("b\n")
    keys = [k for _, k in data_mod.find_files([root / "a.py", root])]
    assert keys == ["corpus/a.py", "corpus/b.txt"]  # every file in a directory (glob None)


F64 = torch.float64


def test_non_utf8_file_names_split_by_the_hash_of_their_bytes(tmp_path):
    import hashlib
    import os
    import sys

    from ssmstream.model.data import load_text

    if sys.platform != "linux":
        pytest.skip("needs a file system that takes non-UTF-8 names")
    root = os.fsencode(tmp_path / "c")
    os.mkdir(root)
    for name, body in ((b"\xff.txt", b"ff" * 8), (b"\xfe.txt", b"fe" * 8), (b"a.txt", b"aa" * 8)):
        with open(os.path.join(root, name), "wb") as f:
            f.write(body)

    def frac(raw: bytes) -> float:
        return int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") / 2**64

    # raw-byte hashes: c/\xfe.txt 0.024 < 0.7 (val), c/\xff.txt 0.743 and c/a.txt 0.832 (train);
    # the name with '?' for the bad byte would hash to 0.657 (val)
    assert frac(b"c/\xfe.txt") < 0.7 < frac(b"c/\xff.txt") < frac(b"c/a.txt")
    assert frac(b"c/?.txt") < 0.7
    d = load_text([tmp_path / "c"], val_fraction=0.7)
    assert d.val_files == ["c/" + os.fsdecode(b"\xfe.txt")]
    assert d.train_files == ["c/a.txt", "c/" + os.fsdecode(b"\xff.txt")]
    assert bytes(d.val.tolist()) == b"fe" * 8


def test_files_are_ordered_by_key_not_by_path(tmp_path):
    from ssmstream.model.data import find_files, load_text

    (tmp_path / "z" / "alpha").mkdir(parents=True)
    (tmp_path / "a" / "beta").mkdir(parents=True)
    (tmp_path / "z" / "alpha" / "x.txt").write_bytes(b"ALPHA")
    (tmp_path / "a" / "beta" / "x.txt").write_bytes(b"BETA")
    dirs = [tmp_path / "a" / "beta", tmp_path / "z" / "alpha"]
    assert [key for _, key in find_files(dirs)] == ["alpha/x.txt", "beta/x.txt"]
    d = load_text(dirs, val_fraction=0.01, min_bytes=2)  # both files hash to train: split by bytes
    assert d.train_files == ["alpha/x.txt", "beta/x.txt"]
    assert bytes(d.train.tolist()) + bytes(d.val.tolist()) == b"ALPHABETA"


def test_signal_length_rounds_the_product():
    from ssmstream.model.data import SignalConfig, signal_batch

    cfg = SignalConfig(rate=100.0, duration=0.29, freq_max=1.0)
    assert 0.29 * 100.0 < 29
    assert cfg.length == 29
    u, y = signal_batch(cfg, 2, torch.Generator().manual_seed(0))
    assert u.shape == (2, 29, 1) and y.shape == (2, 29, 1)


def test_empty_corpus_error_names_the_glob_and_the_path(tmp_path):
    import re

    from ssmstream.model.data import load_text

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(b"hello")
    (tmp_path / "d" / "empty.py").write_bytes(b"")
    where = re.escape(str(tmp_path / "d"))
    with pytest.raises(
        ValueError, match=rf"^empty corpus: no non-empty files matching '\*\.py' under {where}$"
    ):
        load_text([tmp_path / "d"], glob="*.py")
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match=r"no non-empty files matching '\*' under "):
        load_text([tmp_path / "e"])


def test_hidden_and_package_directories_and_their_files_are_skipped(tmp_path):
    """A corpus that is a working tree: nothing under .git or .venv is read (hidden entries
    are skipped whatever their depth), a hidden file in a visible directory neither, nor what
    lies in site-packages, dist-packages (Debian's) or __pycache__."""
    root = tmp_path / "repo"
    for rel in ("a.txt", "sub/b.txt", ".git/config", ".git/objects/ab/cd", ".venv/lib/x.txt",
                "sub/.cache/c.txt", "sub/.hidden.txt", "lib/site-packages/s.txt",
                "lib/dist-packages/d.txt", "sub/__pycache__/p.txt"):  # fmt: skip
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"{rel}\n" * 4)
    assert [key for _, key in find_files([root])] == ["repo/a.txt", "repo/sub/b.txt"]
    d = load_text([root], val_fraction=0.5, min_bytes=2)
    assert d.train.numel() + d.val.numel() == len("a.txt\n" * 4) + len("sub/b.txt\n" * 4)
