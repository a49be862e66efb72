"""Files holding a secret that the server reads at start: the snapshot key, the bearer tokens
(--auth-tokens) and the TLS private key (--tls-key) each get one warning naming them when
group or others may read them; a snapshot.key in --state-dir that another user owns (or a
link to one) is used with a warning naming file and owner (a filesystem that maps owners
shows the server's own key so), while --snapshot-key FILE's owner is not looked at.

Cases that need a file of another user are made by chown to `nobody` when the tests run as
root; otherwise with a file root owns (or skipped when there is none to use)."""

from __future__ import annotations

import logging
import os
import pwd
import shutil

import pytest
from grpc_helpers import make_certs
from ssmstream.runtime.auth import TokenTable
from ssmstream.runtime.config import ServerConfig
from ssmstream.runtime.server import server_credentials, snapshot_key
from ssmstream.runtime.snapshots import KEY_FILE, SnapshotKey

SECRET = b"k" * 32
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("tls"))


def read_snapshot_key(path, certs):
    SnapshotKey.from_file(path)


def read_tokens(path, certs):
    TokenTable.from_file(path)


def read_tls_key(path, certs):
    server_credentials(ServerConfig(model_dir="m", tls_cert=str(certs.server_cert), tls_key=path))


READERS = {  # what the warning calls the file, how it is written, how the server reads it
    "snapshot key": (lambda p, c: p.write_bytes(SECRET), read_snapshot_key),
    "bearer tokens file": (lambda p, c: p.write_text("tok-a alice\n"), read_tokens),
    "TLS private key": (lambda p, c: shutil.copyfile(c.server_key, p), read_tls_key),
}


@pytest.mark.parametrize("what", list(READERS))
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o600, 0o400], ids=oct)
def test_a_secret_file_others_can_read_is_used_with_one_warning(
    tmp_path, caplog, certs, what, mode
):
    write, read = READERS[what]
    path = tmp_path / "secret"
    write(path, certs)
    path.chmod(mode)
    with caplog.at_level(logging.WARNING):
        read(str(path), certs)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if mode & 0o077:
        assert len(said) == 1
        others = f"is readable or writable by other users (mode {mode:o}): "
        assert said[0].startswith(f"{what} {path} {others}")
        assert said[0].endswith("; chmod 600 it")
    else:
        assert said == []


# --- snapshot.key in --state-dir: the server user's own, or refused -------------------------


def others_file(path):
    """`path` holding a key, owned by another user than this process's (None: cannot be made)."""
    path.write_bytes(SECRET)
    if ROOT:
        os.chown(path, pwd.getpwnam("nobody").pw_uid, -1)
        return path
    return None


def user(uid: int) -> str:
    return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"


WARNED = (
    ", the user this server runs as: whoever put it there may know the key and forge "
    "snapshots; unless that user is meant (a filesystem that maps owners), remove it (a new "
    "key is made)"
)


def warned(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "belongs to" in r.getMessage()]


def test_a_state_dir_key_that_another_user_owns_is_warned_of_naming_file_and_owner(
    tmp_path, caplog
):
    state = tmp_path / "state"
    state.mkdir()
    key = others_file(state / KEY_FILE)
    if key is None:
        pytest.skip("a file of another user is made with chown, as root")
    owner = key.stat().st_uid
    with caplog.at_level(logging.WARNING, logger="ssmstream"):
        used = SnapshotKey.in_dir(state)
        at_start = snapshot_key(ServerConfig(model_dir="m", state_dir=str(state)))
    said = f"snapshot key {key} belongs to {user(owner)}, not to {user(os.geteuid())}{WARNED}"
    assert warned(caplog) == [said, said]
    assert used.id == at_start.id == SnapshotKey(SECRET).id
    assert key.read_bytes() == SECRET  # left as it was: no new key made over it


def test_a_state_dir_key_that_links_to_a_file_of_another_user_is_warned_of(tmp_path, caplog):
    state = tmp_path / "state"
    state.mkdir()
    target = others_file(tmp_path / "elsewhere.key")
    if target is None:  # a file root owns will do
        target = next((p for p in ("/etc/passwd", "/etc/hosts") if os.stat(p).st_uid == 0), None)
        if target is None:
            pytest.skip("no file of another user to link to")
    (state / KEY_FILE).symlink_to(target)
    owner = os.stat(target).st_uid
    with caplog.at_level(logging.WARNING, logger="ssmstream"):
        SnapshotKey.in_dir(state)
    link = state / KEY_FILE
    said = f"{os.path.realpath(target)}, which {link} links to belongs to {user(owner)}"
    assert warned(caplog) == [f"snapshot key {said}, not to {user(os.geteuid())}{WARNED}"]


def test_a_state_dir_key_behind_a_link_that_another_user_made_is_warned_of(tmp_path, caplog):
    """The file is the server user's own (its content known to whoever linked to it)."""
    if not ROOT:
        pytest.skip("a link of another user is made with lchown, as root")
    state = tmp_path / "state"
    state.mkdir()
    mine = tmp_path / "readable"
    mine.write_bytes(SECRET)
    link = state / KEY_FILE
    link.symlink_to(mine)
    nobody = pwd.getpwnam("nobody").pw_uid
    os.lchown(link, nobody, -1)
    with caplog.at_level(logging.WARNING, logger="ssmstream"):
        assert SnapshotKey.in_dir(state).id == SnapshotKey(SECRET).id
    said = f"snapshot key {link} belongs to {user(nobody)}, not to {user(0)}{WARNED}"
    assert warned(caplog) == [said]


def test_the_server_users_own_state_dir_key_is_used(tmp_path):
    made = SnapshotKey.in_dir(tmp_path)
    again = SnapshotKey.in_dir(tmp_path)
    assert again.id == made.id and not again.created


def test_a_snapshot_key_flag_takes_a_file_of_another_user(tmp_path, caplog):
    """--snapshot-key FILE is the operator's choice: a secret mounted root-owned and 0644
    (Kubernetes) is used, with the mode warning only."""
    path = others_file(tmp_path / "mounted.key")
    if path is None:
        path = tmp_path / "mounted.key"
        path.write_bytes(SECRET)  # a file of this user: the owner is not looked at either way
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        key = snapshot_key(ServerConfig(model_dir="m", snapshot_key=str(path)))
    assert key.id == SnapshotKey(SECRET).id
    assert f"snapshot key {path} is readable or writable by other users (mode 644)" in caplog.text
