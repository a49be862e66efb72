"""Errors about a function's arguments or config fields, said of the command-line flags that
give them: "warmup_steps=50 must be smaller than steps=2" -> "--warmup-steps 50 must be
smaller than --steps 2" (`ssmstream train`, `ssmstream plot`)."""

from __future__ import annotations

import re
from collections.abc import Iterable


def flag_of(name: str) -> str:
    """The command-line flag of a config field: `--` and its name with dashes."""
    return "--" + name.replace("_", "-")


def said_of_flags(
    message: str,
    names: Iterable[str],
    values: bool = True,
    flags: dict[str, str] | None = None,
    paths: Iterable[str] = (),
) -> str:
    """`message` with each of `names` it starts with (`name:` / `name must`) and, with
    `values`, each `name=value` after a space or at the start, said as its flag: `--name`
    (underscores as dashes) or `flags[name]`. values=False for messages that quote paths
    (`--out lr=3e-4`) not known here; `paths` names those that are (what --out and --data
    gave): where one of them stands as a word of the message it is kept as it is."""
    alt = "|".join(names)
    pattern = re.compile(rf"^({alt})(:| must)|(?<!\S)({alt})(=)")  # not in a path: /lr=3
    flags = flags or {}
    kept = [  # (start, end) of each path where it stands as a word: not a `name=value`
        m.span()
        for p in {p for p in paths if p}
        for m in re.finditer(rf"(?<![^\s'\"]){re.escape(p)}(?=$|[\s:,;'\")/])", message)
    ]

    def flag(name: str) -> str:
        return flags.get(name, flag_of(name))

    def sub(m: re.Match) -> str:
        if not m[1]:
            inside = any(a <= m.start() < b for a, b in kept)
            return flag(m[3]) + " " if values and not inside else m[0]
        return flag(m[1]) + m[2]

    return pattern.sub(sub, message)
