"""`ssmstream verify`: the slot-step line of its report (its worst error and its FAILED
marker), and the default length of the check."""

from __future__ import annotations

from ssmstream.export import verify as verify_mod
from ssmstream.export import verify_cli

REPORT = {
    "passed": False, "dtype": "fp32",
    "tolerance": {"step_vs_torch": 1e-4, "prefill_vs_step": 1e-4},
    "step_vs_torch": {"length": 64, "batch": 2, "max_abs": 0.0, "max_rel": 0.0, "passed": True},
    "slots_vs_step": {"steps": 16, "batch": 2, "max_abs_output": 0.0, "max_abs_state": 2.5e-7,
                      "passed": False},
}  # fmt: skip


def test_a_failed_slot_check_shows_its_state_error_and_the_failed_marker():
    """The slot graph's outputs were right but the state it wrote was not."""
    lines = verify_cli.format_report(REPORT).splitlines()
    assert lines[0] == "parity (fp32): FAILED" and "FAILED" not in lines[1]
    assert lines[2] == (
        "  slot step         max abs 2.50e-07 vs the plain step (bit for bit), "
        "16 steps × batch 2  <-- FAILED"
    )


def test_verify_checks_4096_steps_by_default(tmp_path, monkeypatch):
    seen = []

    def fake(model_dir, ckpt=None, steps=None):
        seen.append(steps)
        return {"passed": True}

    monkeypatch.setattr(verify_mod, "verify_model", fake)
    assert verify_cli.main([str(tmp_path), "--json"]) == 0
    assert seen == [4096]
