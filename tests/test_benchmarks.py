"""The benchmark script runs (tiny configuration); its timings are not asserted here."""

import pathlib
import subprocess
import sys

import pytest

# Each test runs a script in a fresh process: seconds each.
pytestmark = pytest.mark.slow

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def test_benchmark_script_runs_in_its_quick_configuration():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for section in (
        "## Label building",
        "## The report and presets",
        "## Peers",
        "## Eager optimizer update",
        "## Import",
        "## Command line",
        "## Command-line help",
        "## Compiled step",
        "## Freezing: a LoRA fine-tuning step",
        "## Loading",
        "## Layer-wise LR decay",
        "## Adversarial patterns",
        "## Targets",
    ):
        assert section in result.stdout
    for wrapper in ("decay_mask", "masked", "multi_transform"):
        assert f"jaxpr of {wrapper} identical to the hand-written one: True" in result.stdout
