"""Plots that explain an SSM layer by its basis functions and kernels.

A diagonal SSM x'(t) = A x(t) + B u(t) is a bank of N/2 complex modes; the impulse
response of mode n is its basis function

    K_n(t) = e_nᵀ e^{tA} B = e^{t A_n} B_n        (A diagonal)

and the layer's output is y = C x + D u, i.e. the continuous kernel
K(t) = 2 Re Σ_n C_n K_n(t) (conjugate pairs). Sampled with step Δ it becomes the
discrete kernel K[l] the layer convolves with (`SSM.kernel`). The plot shows
Re K_n(t) for the modes of one head (x-axis in samples, t / Δ) and K[l] for a few
heads of a trained layer.

matplotlib is an optional extra (`pip install 'ssmstream[plots]'`), imported only
when a plot is drawn; the figure is rendered with the Agg canvas, so no global
backend is changed.

    ssmstream plot CKPT --out basis.png [--layer 0 --head 0 --length 256]

Dimension letters: H heads, M head width, N state (N/2 complex modes), L kernel
length, T time points.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import FILES, load_checkpoint
from .flags import said_of_flags
from .layers import SSM
from .train import TRAIN_STATE, HelpFormatter

log = logging.getLogger(__name__)


def _figure_class():
    """matplotlib's Figure + Agg canvas, or a clear ImportError."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install 'ssmstream[plots]'"
        ) from e
    return Figure, FigureCanvasAgg


def _check_index(name: str, value: int, size: int) -> None:
    if not 0 <= value < size:
        raise ValueError(f"{name} must be in [0, {size}), got {value}")


@torch.no_grad()
def basis_functions(layer: SSM, t: Tensor, head: int = 0, input: int = 0) -> Tensor:
    """K_n(t) = e^{t A_n} B_n of one head and input channel.

    Args:
        t: [T] real times (continuous; one sample of this head is Δ_head).
        head: h in [0, H); input: m in [0, M).
    Returns:
        [N/2, T] complex.
    """
    _check_index("head", head, layer.heads)
    _check_index("input", input, layer.M)
    A = torch.complex(-torch.exp(layer.log_A_real[head]), layer.A_imag[head])  # [N/2]
    B = torch.view_as_complex(layer.B)[head, :, input]  # [N/2]
    t = t.to(dtype=layer.log_dt.dtype, device=A.device)
    return torch.exp(A[:, None] * t[None, :]) * B[:, None]  # [N/2, T]


MAX_LENGTH = 1 << 16  # samples a plot shows at most


def default_length(layer: SSM, head: int = 0) -> int:
    """Samples until the slowest mode of `head` has decayed by e^{-4} (clipped to 32..4096)."""
    decay = torch.exp(layer.log_A_real[head]).min().item() * torch.exp(layer.log_dt[head]).item()
    if decay * 4096 <= 4.0:  # also a mode that does not decay at all (exp underflowed to 0)
        return 4096
    return max(32, math.ceil(4.0 / decay))


def _not_a_dir(path: Path) -> bool:
    """Whether `path` exists as something other than a directory (a file, a device)."""
    return path.exists() and not path.is_dir()


@torch.no_grad()
def plot_layer(
    layer: SSM,
    path: str | os.PathLike,
    head: int = 0,
    length: int | None = None,
    n_modes: int = 5,
    n_kernels: int = 4,
    title: str | None = None,
) -> Path:
    """Draw Re K_n(t) of `head` (first `n_modes` modes) and K[l] of `n_kernels` heads to a PNG.

    Args:
        length: L, samples shown (None → `default_length`).
    Returns:
        the PNG's path.
    """
    _check_index("head", head, layer.heads)
    out = os.fspath(path)
    if not out.strip():  # "" would be the working directory ("cannot write it: Is a directory")
        raise ValueError(f"path: must name the PNG file to write, got {out!r}")
    if out.endswith((os.sep, os.altsep or os.sep)) or os.path.isdir(out):  # Path() drops the /
        raise ValueError(f"path: {out} is a directory; give the PNG file to write")
    for name, value in (("n_modes", n_modes), ("n_kernels", n_kernels)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    L = default_length(layer, head) if length is None else length
    if not 2 <= L <= MAX_LENGTH:  # more samples than a figure has pixels only use memory
        raise ValueError(f"length must be in [2, {MAX_LENGTH}], got {L}")
    Figure, Canvas = _figure_class()

    dt = torch.exp(layer.log_dt[head]).item()
    samples = torch.linspace(0, L - 1, 8 * L, dtype=torch.float64)  # [T], in samples
    Kn = basis_functions(layer, samples * dt, head).real.cpu()  # [N/2, T]
    K = layer.kernel(L, entry=(0, 0)).cpu()  # [H, L]: input 0 → output 0 of each head

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    Canvas(fig)
    ax_basis, ax_kernel = fig.subplots(1, 2)
    for n in range(min(n_modes, Kn.shape[0])):
        A_n = complex(-math.exp(layer.log_A_real[head, n].item()), layer.A_imag[head, n].item())
        ax_basis.plot(samples, Kn[n], lw=1, label=f"n={n}  A={A_n.real:.2f}{A_n.imag:+.1f}i")
    ax_basis.set(
        title=f"basis functions Re K_n(t) = Re e^(tA_n) B_n, head {head} (Δ={dt:.3g})",
        xlabel="t / Δ (samples)",
        ylabel="Re K_n(t)",
    )
    ax_basis.legend(fontsize=7, loc="upper right")
    for h in range(min(n_kernels, K.shape[0])):
        ax_kernel.plot(torch.arange(L), K[h], lw=1, label=f"head {h}")
    ax_kernel.set(
        title=f"discrete kernels K[l] ({layer.discretization})", xlabel="l", ylabel="K[l]"
    )
    ax_kernel.legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:  # mkdir: "File exists", "Not a dir…"
        in_the_way = next((p for p in reversed(path.parents) if _not_a_dir(p)), None)
        if in_the_way is None:
            raise
        what = f"{in_the_way} is not a directory"
        raise NotADirectoryError(errno.ENOTDIR, what) from e
    fig.savefig(path, dpi=110, format="png")  # PNG whatever the name ends in: written as named
    log.info("wrote %s", path)
    return path


# what `ssmstream train` writes into a checkpoint directory: a plot does not replace them
CHECKPOINT_FILES = (*FILES, TRAIN_STATE)


def plot_checkpoint(
    ckpt: str | os.PathLike, path: str | os.PathLike, layer: int = 0, **kwargs
) -> Path:
    """`plot_layer` of layer `layer` of a checkpoint directory (never to one of its files)."""
    net = load_checkpoint(ckpt)
    _check_index("layer", layer, len(net.ssms))
    own = {(Path(ckpt) / name).resolve() for name in CHECKPOINT_FILES}
    if os.fspath(path).strip() and Path(path).resolve() in own:
        raise ValueError(f"path: {path} is a file of the checkpoint; give another PNG file")
    title = f"{Path(ckpt).name}: layer {layer} of {len(net.ssms)}"
    return plot_layer(net.ssms[layer], path, title=title, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssmstream plot",
        description="Plot the SSM basis functions K_n(t) = e_n^T e^{tA} B and the discrete "
        "kernels of one layer of a checkpoint to a PNG (needs matplotlib).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("ckpt", help="checkpoint directory (from ssmstream train)")
    p.add_argument("--out", default="ssm_basis.png", help="PNG to write")
    p.add_argument("--layer", type=int, default=0, help="which SSM layer")
    p.add_argument("--head", type=int, default=0, help="head whose basis functions are drawn")
    p.add_argument(
        "--length", type=int, default=None, help="samples shown (default: from the layer's Δ)"
    )
    p.add_argument("--n-modes", type=int, default=5, help="basis functions drawn")
    p.add_argument("--n-kernels", type=int, default=4, help="heads whose kernels are drawn")
    return p


# the arguments plot_checkpoint's messages start with (path is given by --out)
_ARGUMENTS = ("path", "layer", "head", "length", "n_modes", "n_kernels")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        plot_checkpoint(
            args.ckpt,
            args.out,
            layer=args.layer,
            head=args.head,
            length=args.length,
            n_modes=args.n_modes,
            n_kernels=args.n_kernels,
        )
    except (ValueError, ImportError) as e:
        parser.error(said_of_flags(str(e), _ARGUMENTS, values=False, flags={"path": "--out"}))
    except OSError as e:  # --out cannot be written
        parser.error(f"--out {args.out}: cannot write it: {e.strerror or e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
