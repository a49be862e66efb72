"""The `ssmstream` command: one entry point, subcommands imported lazily.

Each subcommand lives in its own module with `main(argv) -> int`; only the chosen
one is imported, so `ssmstream serve` never imports torch. Ctrl-C ends any of them with one
line and status 130, a closed stdout pipe (`| head`) quietly with 141, as the shell reports
a tool those signals stop.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import os
import platform
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: …)' only where the default says something (not None / False / "")
    and the help text does not already state it ("(default …", "default: …", "; default …")."""

    def _get_help_string(self, action):
        states = any(w in (action.help or "") for w in ("(default", "default:", "; default"))
        if action.default is None or action.default is False or action.default == "" or states:
            return action.help
        return super()._get_help_string(action)


# name -> (module with main(argv), one-line help, the pyproject extra it needs beyond the
# runtime's own dependencies or "")
COMMANDS = {
    "train": ("ssmstream.model.train", "train an SSM in convolutional mode (torch)", "train"),
    "export": ("ssmstream.export.cli", "export a checkpoint to step/prefill ONNX graphs", "export"),
    "verify": (
        "ssmstream.export.verify_cli", "re-run the parity check of an exported model", "export"
    ),
    "info": ("ssmstream.runtime.info", "print an exported model's manifest as a table", ""),
    "serve": ("ssmstream.runtime.server", "serve an exported model over gRPC", "serve"),
    "generate": ("ssmstream.runtime.generate", "stream a generation from a running server", ""),
    "health": ("ssmstream.runtime.probe", "ask a running server whether it is serving", ""),
    "bench": ("ssmstream.runtime.bench", "quick step-latency benchmark of an exported model", ""),
    "plot": (
        "ssmstream.model.plots", "plot SSM basis functions and kernels of a checkpoint", "plots"
    ),
}  # fmt: skip


def usage() -> str:
    lines = ["usage: ssmstream <command> [options]   (ssmstream <command> --help)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_, _) in COMMANDS.items()]
    lines += ["", "ssmstream --version: this package's, onnxruntime's and Python's versions"]
    return "\n".join(lines)


def version() -> str:
    """`ssmstream --version`: "ssmstream X (onnxruntime Y, Python Z)", from the installed
    packages' metadata (nothing imported: it answers where onnxruntime would not load)."""

    def installed(*names: str) -> str:
        for name in names:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return importlib.metadata.version(name)
        return "not installed"

    own, ort = installed("ssmstream"), installed("onnxruntime-gpu", "onnxruntime")
    return f"ssmstream {own} (onnxruntime {ort}, Python {platform.python_version()})"


def said_of_flags(message: str, flags: dict[str, str]) -> str:
    """A message "name: what" (or "a/b: what") about names `flags` maps to command-line
    flags, said of the flags ("--flag: what"); any other message as it is."""
    names, sep, what = message.partition(":")
    if not sep or not all(n in flags for n in names.split("/")):
        return message
    what = what.strip().replace(" or None, got", ", got")  # a flag is never given None
    return "/".join(flags[n] for n in names.split("/")) + f": {what}"


def stdout_closed() -> int:
    """After a BrokenPipeError on stdout (the reader went away): no second error from the
    interpreter's flush at exit; returns 141 (128 + SIGPIPE), as the shell reports it."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def run_command(run, name: str) -> int:
    """`run()`'s status, with the conventions of every command: Ctrl-C ends it with one line
    ("NAME: interrupted") and 130, a closed stdout pipe quietly with 141 (the examples use
    it too). Text stdout cannot encode (a non-UTF-8 locale, PYTHONIOENCODING=ascii: a
    generated U+FFFD, a model named in another script) is escaped, as Python escapes it on
    stderr, not an error (a UnicodeEncodeError is a ValueError, which `generate` reports as a
    bad argument)."""
    with contextlib.suppress(AttributeError, ValueError):  # not a TextIOWrapper, or closed
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        status = int(run() or 0)
        sys.stdout.flush()  # a buffered stdout meets a closed pipe here, not at exit
        return status
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT
    except BrokenPipeError:
        return stdout_closed()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_command(lambda: _run(argv), " ".join(["ssmstream", *argv[:1]]))


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):  # asked for: stdout, 0; missing: stderr, 2
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ssmstream: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    path, _, extra = COMMANDS[name]
    # read once, when grpc loads: before the command's module imports it (where grpc is
    # loaded already, as in a program that calls main(), it would change nothing). Unset,
    # grpc's core logs at INFO: a line on stderr for each connection that fails its TLS
    # handshake (on a server: a plaintext client, a port scanner, as often as anyone
    # connects; on a client: beside the command's own one-line error)
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as e:  # an extra not installed: say which
        print(
            f"ssmstream {name}: needs the {e.name!r} package: pip install 'ssmstream[{extra}]'"
            if extra
            else f"ssmstream {name}: needs the {e.name!r} package, which is not installed",
            file=sys.stderr,
        )
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
