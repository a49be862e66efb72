"""`ssmstream export CKPT --out MODEL_DIR`: checkpoint → step.onnx + prefill.onnx + manifest.json.

Writes into a temporary directory next to MODEL_DIR and renames it at the end; on any error
it prints one clear message and leaves nothing behind. Exit status 2 when the flags, the
checkpoint or --out cannot be used (a bad flag, a missing or corrupt checkpoint, an
unwritable --out), 1 when the export ran and failed (graphs that fail their parity check, a
failed int8 quantization, a full disk), 128 + the signal when stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from ssmstream.runtime.manifest import name_problem

from .exporter import DTYPES, ExportConfig, ExportError, ExportFailed, abandon_exports


def build_parser() -> argparse.ArgumentParser:
    d = ExportConfig()
    p = argparse.ArgumentParser(
        prog="ssmstream export",
        description="Export a trained checkpoint to a recurrent step ONNX graph, a chunked "
        "prefill ONNX graph and manifest.json, verified against the torch model.",
    )
    p.add_argument(
        "ckpt", metavar="CKPT", help="checkpoint directory (config.json + model.safetensors)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="model directory to create")
    p.add_argument(
        "--dtype",
        default=d.dtype,
        choices=DTYPES,
        help=f"variant: {' | '.join(DTYPES)} (fp16: GPU, weights/activations half, state "
        "float32; int8: edge CPU, dynamic int8 MatMuls) (default: %(default)s)",
    )
    p.add_argument(
        "--dt-scale",
        type=float,
        default=d.dt_scale,
        metavar="S",
        help="multiply every Δ by S: inputs sampled at 1/S × the training rate, no "
        "retraining (default: %(default)s)",
    )
    p.add_argument("--no-prefill", action="store_true", help="write step.onnx only")
    p.add_argument("--name", default=None, help="model name in the manifest (default: DIR's name)")
    p.add_argument(
        "--chunk",
        type=int,
        default=d.chunk,
        metavar="Q",
        help="prefill chunk length, a power of two; a prefill call takes whole chunks, the "
        "last one may end in padding (default: %(default)s)",
    )
    p.add_argument(
        "--max-chunks",
        type=int,
        default=d.max_chunks,
        metavar="N",
        help="chunks per prefill call: T <= Q*N (manifest graphs.prefill.max_len) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--verify-steps",
        type=int,
        default=d.verify_steps,
        metavar="L",
        help="length of the random sequence the parity check runs (default: %(default)s)",
    )
    p.add_argument(
        "--no-verify", action="store_true", help="skip the parity check (not recommended)"
    )
    p.add_argument("--no-optimize", action="store_true", help="do not run onnxslim")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace DIR if it holds an exported model (never a checkpoint or another directory)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_flags(parser, args)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("ssmstream").setLevel(logging.WARNING if args.quiet else logging.INFO)
    from .exporter import export_model

    try:
        with _signals_end_the_export():
            out = export_model(
                args.ckpt,
                args.out,
                dtype=args.dtype,
                dt_scale=args.dt_scale,
                prefill=not args.no_prefill,
                verify=not args.no_verify,
                chunk=args.chunk,
                max_chunks=args.max_chunks,
                verify_steps=args.verify_steps,
                optimize=not args.no_optimize,
                name=args.name,
                overwrite=args.force,
                progress=not args.quiet,
            )
    except ExportError as e:
        print(f"ssmstream export: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, ExportFailed) else 2
    except OSError as e:  # a full disk while the graphs were written (nothing is left)
        where = e.filename or args.out  # read or written: a checkpoint's file, or --out's
        print(f"ssmstream export: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    if not args.quiet:
        from ssmstream.runtime.manifest import format_manifest, load_manifest

        print(format_manifest(load_manifest(out), out))
    return 0


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A flag value ExportConfig refuses is a usage error (status 2) naming the flag, found
    before the checkpoint is read."""
    try:
        ExportConfig(
            dt_scale=args.dt_scale,
            chunk=args.chunk,
            max_chunks=args.max_chunks,
            verify_steps=args.verify_steps,
        )
    except ExportError as e:  # its messages begin with the field's name
        parser.error(f"argument --{str(e).split()[0].replace('_', '-')}: {e}")
    if args.name is not None and (why := name_problem(args.name)):
        parser.error(f"argument --name: the model name {why}")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _signals_end_the_export():
    """SIGTERM (a timeout, `docker stop`, a CI cancel) and SIGINT (Ctrl-C) end the export at
    once with status 128 + the signal, its temporary directory removed. The handler exits the
    process itself (os._exit) rather than raise: an exception raised from a handler can land
    inside torch's C++ (an abort that leaves the directory), an import or a __del__ (where it
    is swallowed). A signal while the finished model is renamed into place lets the renames
    finish and exits after them. The previous handlers are back afterwards; signals are set
    in the main thread only: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def say(text: str) -> None:  # not print: the main thread may be inside a write to stderr
        with contextlib.suppress(OSError):
            os.write(2, f"ssmstream export: {text}\n".encode())

    def stop(signum, frame):
        removed = abandon_exports()
        if removed is None:
            pending.append(signum)
            return
        name = signal.Signals(signum).name  # before the export began or after it: no claim
        say(f"stopped by {name}; nothing written" if removed else f"stopped by {name}")
        os._exit(128 + signum)

    # a signal ignored when we started (SIGINT of a background job) stays ignored
    stops = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
    before = {s: signal.signal(s, stop) for s in stops}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if pending:
        say(f"stopped by {signal.Signals(pending[0]).name} as the model was renamed into place; "
            "it is complete")  # fmt: skip
        raise SystemExit(128 + pending[0])


if __name__ == "__main__":
    sys.exit(main())
