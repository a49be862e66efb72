"""The whole job in one script (what `make demo` runs).

1. export the shipped checkpoint to ONNX (step + prefill graphs, verified),
2. start `ssmstream serve` on 127.0.0.1 (a free port),
3. stream a generation through `ssmstream generate`, printed as it arrives, with tokens/s,
4. show sessions at work: prefill a prompt, snapshot it, fork it, restore the snapshot —
   all three continue identically,
5. say where the model ran (execution provider) and what crossed between the host and the
   state slab's device per streamed token (from the server's metrics),
6. stop the server (SIGTERM: drain, save) and exit 0.

    python examples/quickstart.py [--ckpt DIR] [--workdir .demo] [--prompt TEXT] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CKPT = ROOT / "examples" / "checkpoints" / "byte-lm"
TEXT_ONLY = "--ckpt: the demo streams text, so it needs a byte-level token model (vocab 256)"


def ssmstream(*args: str) -> list[str]:
    """The command line of `ssmstream ARGS` with this interpreter (no PATH needed)."""
    return [sys.executable, "-m", "ssmstream.runtime.cli", *args]


def export(ckpt: Path, model_dir: Path, verify_steps: int) -> bool:
    """Export unless model_dir already holds a passing export of these weights whose graphs
    are the ones its manifest names (as the server checks them); returns whether it exported."""
    from ssmstream.runtime.manifest import load_manifest, sha256_file

    try:
        m = load_manifest(model_dir)  # ModelError (a ValueError): a graph missing or changed
    except (OSError, ValueError):
        m = {}
    weights = sha256_file(ckpt / "model.safetensors")
    if m.get("source", {}).get("weights_sha256") == weights and m.get("parity", {}).get("passed"):
        print(f"== using the existing export of {ckpt} in {model_dir}")
        return False
    print(f"== exporting {ckpt} -> {model_dir}")
    cmd = ssmstream(
        "export", str(ckpt), "--out", str(model_dir), "--force",
        "--verify-steps", str(verify_steps),
    )  # fmt: skip
    run(cmd)
    return True


def run(cmd: list[str]) -> None:
    """subprocess.run(cmd, check=True), except that a SIGTERM or Ctrl-C meanwhile stops the
    command with SIGTERM and waits for it: subprocess.run SIGKILLs it, and an export killed
    so leaves its temporary directory behind."""
    proc = subprocess.Popen(cmd)
    try:
        code = proc.wait()
    except BaseException:
        stop(proc)
        raise
    if code:
        raise subprocess.CalledProcessError(code, cmd)


def start_server(model_dir: Path, workdir: Path, device: str) -> tuple[subprocess.Popen, str, int]:
    port_file = workdir / "server.json"
    port_file.unlink(missing_ok=True)
    log = open(workdir / "server.log", "w")  # noqa: SIM115 (lives as long as the server)
    cmd = ssmstream(
        "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0",
        "--port-file", str(port_file), "--state-dir", str(workdir / "state"),
        "--device", device, "--metrics-port", "0",
    )  # fmt: skip
    print("== starting:", " ".join(cmd[3:]))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.is_file():
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the server did not start; see {workdir / 'server.log'}")
            time.sleep(0.1)
        ports = json.loads(port_file.read_text())
    except BaseException:  # also SIGTERM (SystemExit) or Ctrl-C while it starts: stop it
        stop(proc)
        raise
    port = ports["port"]
    print(f"== serving on 127.0.0.1:{port} (log: {workdir / 'server.log'})")
    return proc, f"127.0.0.1:{port}", ports["metrics_port"]


def transfer_report(target: str, metrics_port: int) -> None:
    """Where the model runs, and the host<->device bytes per batched token (measured)."""
    from prometheus_client.parser import text_string_to_metric_families
    from ssmstream.runtime.client import Client

    with Client(target, timeout=30) as client:
        provider = client.info().provider
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {
        (s.name, s.labels.get("path"), s.labels.get("direction")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    name = "ssmstream_state_slab_transfer_bytes_total"
    step_in = values.get((name, "step", "in"), 0.0)
    step_out = values.get((name, "step", "out"), 0.0)
    steps = values.get(("ssmstream_state_slab_steps_total", None, None), 0.0)
    print(f"== provider: {provider}; the sessions' states stay in the slab on its device")
    if steps:
        print(
            f"   {int(steps)} batched steps moved {step_in / steps:,.0f} B in (input, slot) and "
            f"{step_out / steps:,.0f} B out (outputs) per step, host<->device"
        )


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 30 s; reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sessions_demo(target: str, prompt: str, n: int) -> None:
    from ssmstream.runtime.client import Client

    data = list(prompt.encode())
    head, last = data[:-1], data[-1:]  # Generate starts from its last prompt token

    def continuation(session) -> str:
        toks = [r.token for r in session.generate(last, max_new_tokens=n, temperature=0.7, seed=1)]
        return bytes(t for t in toks if t < 256).decode("utf-8", errors="replace")

    with Client(target) as client:
        a = client.create_session()
        r = a.step(tokens=head)
        print(f"== session {a.id[:8]}…: prefilled {r.position} bytes of the prompt")
        snap = a.snapshot()
        b = a.fork()
        c = client.restore(snap)
        print(f"   snapshot: {len(snap)} bytes; fork {b.id[:8]}…; restored {c.id[:8]}…")
        outs = {name: continuation(s) for name, s in (("parent", a), ("fork", b), ("restored", c))}
        for name, text in outs.items():
            print(f"   {name:>8}: {text!r}")
        same = len(set(outs.values())) == 1
        print(f"   all three continue identically (same sampling seed): {same}")
        for s in (a, b, c):
            s.close()
        if not same:
            sys.exit("snapshot/fork/restore diverged")


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written above the options; each option's default in its help."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint to export and serve")
    p.add_argument("--workdir", type=Path, default=ROOT / ".demo", help="export, logs and state")
    p.add_argument(
        "--prompt",
        default="def fibonacci(n):\n    ",
        help=r"prompt text (default: 'def fibonacci(n):\n' and 4 spaces)",
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--verify-steps", type=int, default=4096, help="export parity length")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run the model"
    )
    a = p.parse_args(argv)
    # absolute: a relative path starting with "-" would be read as a flag by the commands
    a.ckpt, a.workdir = a.ckpt.absolute(), a.workdir.absolute()
    if not a.prompt:
        p.error("--prompt: give at least one character")
    if a.max_new_tokens < 1:
        p.error(f"--max-new-tokens: must be at least 1, got {a.max_new_tokens}")
    if a.verify_steps < 1:
        p.error(f"--verify-steps: must be at least 1, got {a.verify_steps}")
    try:
        a.workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--workdir: cannot make {a.workdir}: {e.strerror or e}")
    # SIGTERM (timeout, a cancelled CI job, kill) stops the server as Ctrl-C does
    before = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return demo(p, a)
    except subprocess.CalledProcessError as e:  # the command said why, on its stderr
        return e.returncode
    finally:  # a caller that runs main() in-process gets its own handler back
        signal.signal(signal.SIGTERM, before)


def demo(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    model_dir = a.workdir / "model"
    if not (a.ckpt / "model.safetensors").is_file():
        p.error(f"--ckpt: {a.ckpt} has no model.safetensors (an `ssmstream train` checkpoint)")
    try:  # before the export replaces the workdir's model and removes its saved sessions
        model = json.loads((a.ckpt / "config.json").read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        model = None  # the export says what is wrong with the checkpoint
    if isinstance(model, dict) and not (
        isinstance(model.get("vocab_size"), int) and model["vocab_size"] >= 256
    ):
        p.error(TEXT_ONLY)
    if export(a.ckpt, model_dir, a.verify_steps) and (a.workdir / "state").exists():
        print("== removing the sessions saved with the previous export (another model's)")
        shutil.rmtree(a.workdir / "state")
    m = json.loads((model_dir / "manifest.json").read_text())
    if m["input_kind"] != "tokens" or m["vocab_size"] < 256:
        p.error(TEXT_ONLY)
    proc, target, metrics_port = start_server(model_dir, a.workdir, a.device)
    try:
        print(f"== ssmstream generate --server {target} {a.prompt!r}\n")
        sys.stdout.write(a.prompt)
        sys.stdout.flush()
        run(
            ssmstream(
                "generate",
                "--server",
                target,
                "--max-new-tokens",
                str(a.max_new_tokens),
                "--seed",
                "0",
                "--stats",
                "--",  # the prompt may start with "-"
                a.prompt,
            ),  # fmt: skip
        )
        print()
        sessions_demo(target, "    def __init__(self, name):\n        self.", n=60)
        transfer_report(target, metrics_port)
    finally:
        stop(proc)
    state_dir = a.workdir / "state"
    print(f"== server stopped (exit status {proc.returncode}); sessions saved in {state_dir}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    from ssmstream.runtime.cli import run_command

    sys.exit(run_command(main, "quickstart.py"))
