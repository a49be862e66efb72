"""Files that hold a secret the server reads at start: the snapshot signing key
(`--snapshot-key`, `snapshot.key` in `--state-dir`), the bearer tokens (`--auth-tokens`) and
the TLS private key (`--tls-key`).

Each is used as it is, with one warning when its mode lets group or others read or write
it (a file mounted from a secret store may be so on purpose; whoever can read it holds the
secret).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def warn_unless_private(path: str | os.PathLike, what: str, risk: str) -> None:
    """Log a warning naming `path` when group or others may read or write it. `what` names
    the file ("snapshot key"), `risk` says what a reader of it can do. Not on Windows: there
    a file's mode is 0666 or 0444 whoever may read it (its access list says who may)."""
    if sys.platform == "win32":
        return
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:  # gone since it was read: what was read is used, nothing to say
        return
    if mode & 0o077:
        log.warning(
            "%s %s is readable or writable by other users (mode %o): %s; chmod 600 it",
            what,
            path,
            mode,
            risk,
        )
