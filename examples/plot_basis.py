"""Plot the SSM basis functions and kernels of a shipped checkpoint (no notebook).

A diagonal SSM layer is a bank of N/2 complex modes; mode n's impulse response is its
basis function

    K_n(t) = e^{t A_n} B_n               (A_n = −exp(log_A_real) + i·A_imag)

and the layer convolves its input with the discrete kernel K[l] = 2 Re Σ_n C_n Ā_n^l B̄_n,
Ā_n = exp(Δ A_n). S4D-Lin starts every channel from the same ladder of frequencies
(A_imag = π n) with one decay (−½); training moves decays, frequencies and Δ.

This script draws, for one layer of a checkpoint (ssmstream.model.plots.plot_layer):
  OUT            Re K_n(t) of the first modes of one head + K[l] of a few heads (trained)
  OUT_init.png   the same for a freshly initialized network of the same config (--init),
                 so the two PNGs show what training changed.

    python examples/plot_basis.py                                   # byte-lm, layer 0
    python examples/plot_basis.py examples/checkpoints/signal --out signal_basis.png
    ssmstream plot CKPT --out basis.png                             # the library's CLI

Dimension letters: H heads, N state (N/2 complex modes), L kernel length.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from ssmstream.model import SSMNetwork, load_checkpoint
from ssmstream.model.flags import said_of_flags
from ssmstream.model.plots import default_length, plot_layer
from ssmstream.model.train import HelpFormatter

log = logging.getLogger("plot_basis")

ROOT = Path(__file__).resolve().parents[1]
BYTE_LM = ROOT / "examples" / "checkpoints" / "byte-lm"


def plot_basis(
    ckpt: str | Path,
    out: str | Path,
    layer: int = 0,
    head: int = 0,
    length: int | None = None,
    init: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Write the trained layer's PNG (and, with `init`, the untrained one's); return the paths.

    Raises ValueError (naming the argument) for a bad checkpoint, layer or head.
    """
    net = load_checkpoint(ckpt)
    if not 0 <= layer < len(net.ssms):
        raise ValueError(f"layer must be in [0, {len(net.ssms)}), got {layer}")
    if init and not -(2**63) <= seed < 2**64:  # torch.manual_seed's range, before any PNG
        raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {seed}")
    name = Path(ckpt).resolve().name
    paths = [
        plot_layer(
            net.ssms[layer],
            out,  # as given: plot_layer refuses a trailing '/', which Path() would drop
            head=head,
            length=length,
            title=f"{name}: layer {layer} of {len(net.ssms)}, trained",
        )
    ]
    if init:
        torch.manual_seed(seed)
        fresh = SSMNetwork(net.cfg).eval()  # same config, weights as initialized
        # the trained layer's length, so the two figures share their time axis
        L = length if length is not None else default_length(net.ssms[layer], head)
        paths.append(
            plot_layer(
                fresh.ssms[layer],
                paths[0].with_name(f"{paths[0].stem}_init{paths[0].suffix or '.png'}"),
                head=head,
                length=L,
                title=f"{name}: layer {layer}, at initialization ({net.cfg.init}, seed {seed})",
            )
        )
    return paths


# the arguments the errors of plot_basis (and plot_layer) start with, said as flags
ARGUMENTS = ("path", "layer", "head", "length", "seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Plot the SSM basis functions K_n(t) = e^{tA_n} B_n and the discrete kernels "
        "K[l] of one layer of a checkpoint to a PNG, next to the same layer at initialization.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("ckpt", nargs="?", default=str(BYTE_LM), help="checkpoint directory")
    p.add_argument("--out", default="ssm_basis.png", help="PNG to write (+ _init.png)")
    p.add_argument("--layer", type=int, default=0, help="which SSM layer")
    p.add_argument("--head", type=int, default=0, help="head whose basis functions are drawn")
    p.add_argument(
        "--length",
        type=int,
        default=None,
        help="samples shown (none: until the slowest mode decays)",
    )
    p.add_argument(
        "--init",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also plot the layer of a freshly initialized network",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh initialization")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    """Run from the command line; returns the PNGs written."""
    parser = build_parser()
    a = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = plot_basis(a.ckpt, a.out, a.layer, a.head, a.length, a.init, a.seed)
    except (ValueError, ImportError) as e:  # the plot's `path` is this script's --out
        parser.error(said_of_flags(str(e), ARGUMENTS, values=False, flags={"path": "--out"}))
    except OSError as e:  # --out (or a directory on its way) cannot be written, or a file read
        where = Path(e.filename or a.out)
        out = Path(a.out).resolve()
        if where.resolve() in (out, *out.parents):
            parser.error(f"--out {where}: cannot write it: {e.strerror or e}")
        parser.error(f"{where}: cannot read it: {e.strerror or e}")
    return paths


if __name__ == "__main__":
    from ssmstream.runtime.cli import run_command

    sys.exit(run_command(lambda: main() and 0, "plot_basis.py"))  # main returns the PNGs
