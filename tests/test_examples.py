"""The example scripts run, end to end, with a small step count."""

import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def test_train_gpt_prints_the_report_and_the_loss_falls():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_gpt.py"), "--steps", "60"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    out = result.stdout
    assert "blocks.1.attn.query_proj.weight" in out and "no_decay" in out
    first, last = (float(x) for x in out.rsplit("loss ", 1)[1].split(" (")[0].split(" -> "))
    assert last < first - 1.0, out
