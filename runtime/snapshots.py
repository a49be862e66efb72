"""Signed session bytes: snapshots (`SnapshotSession`) and the session file (`--state-dir`).

A session's state leaves the server in two forms, both signed with the server's key
(HMAC-SHA256), so bytes that did not come from a server holding that key are refused:

Snapshot (format version 2, little endian):

    magic b"SSMSNAP\\0" | u32 version | u64 S | u64 position | u16 len | model sha (ascii)
    | float32 [S] state | key id (8 bytes) | HMAC-SHA256(key, everything before) (32 bytes)

Session file `sessions.bin`:

    magic b"SSMSTOR\\0" | u32 version | u32 header length | JSON header
    (model_sha, state_size, sessions: [{id, principal, position, ttl, incarnation}])
    | float32 [n, S] | key id (8 bytes) | HMAC-SHA256(key, everything before) (32 bytes)

key id = HMAC-SHA256(key, "ssmstream snapshot key id")[:8]: it tells bytes signed with
another server's key from tampered bytes, and reveals nothing about the key.

On the way in, each check names what failed: not ours (magic), unsigned (format version
1), an unknown version, signed with another key, tampered (signature mismatch), a length
that does not match the header; then what a signature cannot vouch for: another model
(ModelError), a state that is not finite, a position beyond MAX_POSITION.

The key: `--snapshot-key FILE`, else `snapshot.key` in `--state-dir` (created 0600 on
first start; warned of when another user owns it), else the shared store's key (one per
Redis, so every replica shares it), else a random key for this process only (snapshots then
die with the process).

Dimension letters: S packed state size, n sessions in a file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import struct
from pathlib import Path

import numpy as np

from .errors import InvalidInput, ModelError
from .secret_files import warn_unless_private

log = logging.getLogger(__name__)

SNAP_MAGIC = b"SSMSNAP\0"
STORE_MAGIC = b"SSMSTOR\0"
VERSION = 2  # 1: sha256 checksum only (unsigned), refused
KEY_FILE = "snapshot.key"
BYTES_LIKE = (bytes, bytearray, memoryview)  # what a snapshot may come as
BytesLike = bytes | bytearray | memoryview  # the same, as a type
MAX_POSITION = 2**63 - 1  # positions count on from here (the wire has uint64)
MIN_KEY_BYTES = 16
_SNAP_HEAD = struct.Struct("<8sIQQH")  # magic, version, S, position, sha length
_STORE_HEAD = struct.Struct("<8sII")  # magic, version, JSON header length
_KEY_ID, _MAC = 8, 32
_TRAILER = _KEY_ID + _MAC
# os.open's files are opened in text mode on Windows (a written \n becomes \r\n) unless
# O_BINARY is given; there is no such flag elsewhere
O_BINARY = getattr(os, "O_BINARY", 0)


def _write_key(path: Path, secret: bytes) -> bool:
    """Write a key file (mode 0600) whole to a private file, then link it into place: servers
    starting together on one directory never read a half-written key, and all of them end up
    with the one linked first. False when another process linked one meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_BINARY, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secret + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:  # another process made it meanwhile: use theirs
        return False
    finally:
        tmp.unlink()


def _warn_owner(path: Path) -> None:
    """A warning when the key file in the state directory (or the link at its name) belongs
    to another user than the one this process runs as: whoever could write the directory
    before the first start may have put it there, knowing the key, to forge snapshots. Not a
    refusal: a network filesystem that maps owners (NFS's root squashing) shows the key a
    server made itself as another user's, at every start. A key given with --snapshot-key is
    the operator's choice and not looked at. (Not on Windows: no user ids.)"""
    if not hasattr(os, "geteuid"):
        return
    me = os.geteuid()
    try:
        link, file = os.lstat(path), os.stat(path)
    except OSError:  # from_file says what is wrong with it
        return
    target = os.path.realpath(path)
    for st, what in ((link, str(path)), (file, f"{target}, which {path} links to")):
        if st.st_uid != me:
            log.warning(
                "snapshot key %s belongs to %s, not to %s, the user this server runs as: "
                "whoever put it there may know the key and forge snapshots; unless that user "
                "is meant (a filesystem that maps owners), remove it (a new key is made)",
                what, _user(st.st_uid), _user(me),
            )  # fmt: skip
            return


def _user(uid: int) -> str:
    import pwd  # POSIX only: _warn_owner runs only where there are user ids

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:  # no passwd entry (a container's arbitrary uid)
        return f"uid {uid}"


class OtherKey(InvalidInput):
    """Signed bytes whose key id is not this key's: signed by another server's key."""


class SnapshotKey:
    """The server's signing key. `sign(body)` appends key id + HMAC; `verify` checks them."""

    def __init__(self, secret: bytes):
        if not isinstance(secret, bytes) or len(secret) < MIN_KEY_BYTES:
            raise InvalidInput("snapshot_key", f"must be at least {MIN_KEY_BYTES} bytes")
        self.secret = secret
        self.id = hmac.new(secret, b"ssmstream snapshot key id", hashlib.sha256).digest()[:_KEY_ID]
        self.path: Path | None = None  # in_dir's: the file `keep` writes back
        self.created = False  # in_dir's: this process made the file (it was missing)

    @classmethod
    def generate(cls) -> SnapshotKey:
        """A random key: snapshots it signs are valid only while this object lives (keep
        one across processes with `in_dir` or `from_file`)."""
        return cls(secrets.token_hex(32).encode())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SnapshotKey:
        """The key in a file (its bytes, surrounding whitespace stripped)."""
        try:
            secret = Path(path).read_bytes().strip()
        except OSError as e:
            raise InvalidInput("snapshot_key", f"cannot read {path}: {e.strerror}") from e
        if len(secret) < MIN_KEY_BYTES:
            raise InvalidInput(
                "snapshot_key", f"{path} holds {len(secret)} bytes; use at least {MIN_KEY_BYTES}"
            )
        warn_unless_private(
            path, "snapshot key", "whoever reads it can sign snapshots this server accepts"
        )
        return cls(secret)

    @classmethod
    def in_dir(cls, directory: str | os.PathLike) -> SnapshotKey:
        """The key kept in directory/snapshot.key, created (mode 0600) when missing.

        A new key is written whole to a private file and then linked into place, so servers
        starting together on one directory never read a half-written key, and all of them
        end up with the one that was linked first. A key file that belongs to another user
        (or a link to one) is warned of: see `_warn_owner`."""
        path = Path(directory) / KEY_FILE
        created = not path.exists() and _write_key(path, cls.generate().secret)
        if created:
            log.info("created snapshot signing key %s", path)
        _warn_owner(path)
        key = cls.from_file(path)
        key.path, key.created = path, created
        return key

    def keep(self) -> None:
        """An `in_dir` key: write it back when its file is gone (the directory removed while
        the server ran), as the sessions file saved beside it loads only with it. Called
        before each save; a key file that cannot be written is logged and the save goes on
        (an operator's --snapshot-key file is never written)."""
        if self.path is None or self.path.exists():
            return
        try:
            if _write_key(self.path, self.secret):
                log.warning(
                    "snapshot key %s was gone; written back for the sessions saved", self.path
                )
        except OSError as e:
            log.error(
                "snapshot key %s is gone and cannot be written back (%s): the sessions saved "
                "beside it load only with it",
                self.path,
                e.strerror or e,
            )

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.secret, body, hashlib.sha256).digest()

    def sign(self, body: bytes) -> bytes:
        """body | key id | HMAC(key, body | key id)."""
        body += self.id
        return body + self._mac(body)

    def verify(self, data: bytes, field: str, what: str, size: int = 0) -> bytes:
        """The body of signed bytes, else InvalidInput naming the failed check. size: the
        length the (not yet verified) header declares, so a truncated file or snapshot says
        so rather than failing the key check (the key id is in the trailer it lost)."""
        _check_length(len(data), size, field, what)
        key_id = data[-_TRAILER:-_MAC]
        if not hmac.compare_digest(key_id, self.id):
            raise OtherKey(
                field, _say(what, "is signed with another server key (see --snapshot-key)")
            )
        if not hmac.compare_digest(self._mac(data[:-_MAC]), data[-_MAC:]):
            raise InvalidInput(field, _say(what, "was tampered with (signature mismatch)"))
        return data[:-_TRAILER]


def _check_length(length: int, size: int, field: str, what: str) -> None:
    """InvalidInput when signed bytes of `length` cannot hold their trailer, or differ from
    the `size` their (not yet verified) header declares (0: not known)."""
    if length < _TRAILER:
        raise InvalidInput(field, _say(what, "is truncated"))
    if length < size:  # the header is not verified yet: it may be the forged part
        raise InvalidInput(
            field, _say(what, "is truncated (shorter than its header says) or was tampered with")
        )
    if size and length > size:  # bytes appended (the key id is read from the end)
        raise InvalidInput(
            field,
            _say(what, "is longer than its header says (bytes appended) or was tampered with"),
        )


def _say(what: str, text: str) -> str:
    return f"{what} {text}" if what else text


def _check_version(version: int, field: str, what: str) -> None:
    """A session file (`what` names it) of another version says what to do with it: one of
    0.1.0 is written at every stop, even with no sessions, and its sessions cannot be carried
    over (nothing vouches for them)."""
    if version == 1:
        todo = "; move it aside to start (its sessions cannot be restored)" if what else ""
        raise InvalidInput(
            field,
            _say(what, f"is unsigned (format version 1, ssmstream 0.1.0); this server needs "
                 f"{VERSION}{todo}"),
        )  # fmt: skip
    if version != VERSION:
        newer = "; it was written by a newer ssmstream" if version > VERSION else ""
        raise InvalidInput(
            field,
            _say(what, f"has format version {version}, not supported (want {VERSION}){newer}"),
        )


def check_state(state: np.ndarray, position: int, field: str, what: str = "") -> None:
    """What a signature cannot vouch for: a finite state and a position in range."""
    if not np.isfinite(state).all():
        raise InvalidInput(field, _say(what, "has a state that contains NaN or inf"))
    if not 0 <= position <= MAX_POSITION:
        raise InvalidInput(
            field, _say(what, f"has position {position}, out of range [0, 2**63 - 1]")
        )


# --- snapshots ------------------------------------------------------------------------------


def encode_snapshot(key: SnapshotKey, model_sha: str, state: np.ndarray, position: int) -> bytes:
    """A signed snapshot of state [S] at `position`."""
    sha = model_sha.encode("ascii")
    head = _SNAP_HEAD.pack(SNAP_MAGIC, VERSION, state.shape[0], position, len(sha))
    return key.sign(head + sha + state.astype("<f4", copy=False).tobytes())


def snapshot_position(data: bytes) -> int:
    """The position in a snapshot this server made (no checks)."""
    return _SNAP_HEAD.unpack_from(data)[3]


def decode_snapshot(
    key: SnapshotKey, data: BytesLike, model_sha: str, state_size: int
) -> tuple[int, np.ndarray]:
    """Verify a snapshot → (position, state float32 [S]).

    Raises InvalidInput("snapshot", …) naming the failed check, or ModelError (another
    model or state size).
    """
    if not isinstance(data, BYTES_LIKE):
        raise InvalidInput("snapshot", f"must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if data and len(data) < _SNAP_HEAD.size and SNAP_MAGIC.startswith(data[: len(SNAP_MAGIC)]):
        raise InvalidInput("snapshot", "is truncated (cut inside its header)")
    if len(data) < _SNAP_HEAD.size or not data.startswith(SNAP_MAGIC):
        raise InvalidInput("snapshot", "is not an ssmstream session snapshot")
    _, version, S, position, sha_len = _SNAP_HEAD.unpack_from(data)
    _check_version(version, "snapshot", "")
    body = key.verify(data, "snapshot", "", _SNAP_HEAD.size + sha_len + 4 * S + _TRAILER)
    o = _SNAP_HEAD.size
    if len(body) != o + sha_len + 4 * S:
        raise InvalidInput("snapshot", "length does not match its header")
    sha = body[o : o + sha_len].decode("ascii", errors="replace")
    if sha != model_sha:
        raise ModelError(
            f"snapshot belongs to another model (sha {sha[:16]!r}…, this model {model_sha[:16]!r}…)"
        )
    if S != state_size:
        raise ModelError(f"snapshot has state size {S}, this model has {state_size}")
    state = np.frombuffer(body, dtype="<f4", count=S, offset=o + sha_len).astype(np.float32)
    check_state(state, position, "snapshot")
    return int(position), state  # [S]


# --- the session file -----------------------------------------------------------------------


def write_session_file(f, key: SnapshotKey, header: dict, parts: list[np.ndarray]) -> None:
    """A signed session file written to the binary file `f`: the JSON header, then the
    states given as parts (float32 [k, S] each, in order), none copied whole: body | key id |
    HMAC of both (what decode_session_file reads)."""
    head = json.dumps(header, allow_nan=True).encode()
    mac = hmac.new(key.secret, digestmod=hashlib.sha256)
    rows = (np.ascontiguousarray(p, dtype="<f4").reshape(-1).view(np.uint8) for p in parts)
    for data in (_STORE_HEAD.pack(STORE_MAGIC, VERSION, len(head)) + head, *rows, key.id):
        mac.update(data)
        f.write(data)
    f.write(mac.digest())


def read_session_file(key: SnapshotKey, path: Path) -> tuple[dict, np.ndarray]:
    """decode_session_file of the file at `path`, whose head is checked before the rest is
    read: a file that is not a session store (a link to some large file) is refused after
    its first 16 bytes, one whose size differs from what its header declares after the
    header (the messages are decode_session_file's)."""
    what = str(path)
    with open(path, "rb") as f:
        length = os.fstat(f.fileno()).st_size
        data = f.read(_STORE_HEAD.size)
        o = _store_head(data, what)
        data += f.read(max(0, min(o, length) - len(data)))  # the header, within the file
        parsed = _store_header(data, o)
        _check_length(length, parsed[2], "state_dir", what)
        data += f.read()  # the length the header declares (all of it: a header not JSON)
    return _verified_store(key, data, what, o, parsed)


def _store_head(data: bytes, what: str) -> int:
    """Where the JSON header of session-file bytes ends, from their magic, version and header
    length; InvalidInput for another file or version."""
    if len(data) < _STORE_HEAD.size or not data.startswith(STORE_MAGIC):
        raise InvalidInput("state_dir", f"{what} is not an ssmstream session store")
    _, version, hlen = _STORE_HEAD.unpack_from(data)
    _check_version(version, "state_dir", what)
    return _STORE_HEAD.size + hlen


def _store_header(data: bytes, o: int) -> tuple[dict | None, Exception | None, int]:
    """(header, None, the file size it declares), or (None, why it is unreadable, the least
    size it declares, or 0). The header is read before the signature is checked, to tell a
    truncated file from one signed with another key by the length it declares; it is
    trusted only after the check."""
    try:
        header = json.loads(data[_STORE_HEAD.size : o])
        S, n = int(header["state_size"]), len(header["sessions"])
        return header, None, o + 4 * n * S + _TRAILER
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
        return None, e, (o + _TRAILER if len(data) < o else 0)


def decode_session_file(key: SnapshotKey, data: bytes, path: Path) -> tuple[dict, np.ndarray]:
    """Verify session-file bytes → (JSON header, states float32 [n, S]).

    Raises InvalidInput("state_dir", …) naming the file and the failed check; the caller
    checks the header's model, ids and limits.
    """
    what = str(path)
    o = _store_head(data, what)
    return _verified_store(key, data, what, o, _store_header(data, o))


def _verified_store(key: SnapshotKey, data: bytes, what: str, o: int, parsed: tuple):
    """decode_session_file's checks after the head, from the header as _store_header read
    it (`parsed`: read once, also by read_session_file before the rest of the file)."""
    header, bad, size = parsed
    body = key.verify(data, "state_dir", what, size)
    if bad is not None:
        raise InvalidInput("state_dir", f"{what}: bad header: {bad}") from bad
    S, n = int(header["state_size"]), len(header["sessions"])
    if len(body) != o + 4 * n * S:
        raise InvalidInput("state_dir", f"{what}: length does not match its header")
    states = np.frombuffer(body, dtype="<f4", count=n * S, offset=o).reshape(n, S)  # [n, S]
    return header, states.astype(np.float32)
