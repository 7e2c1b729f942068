"""Every Python block of the README runs as shown, in a fresh interpreter and an empty folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
# Each block's first line that says what it is, for the test id.
IDS = [
    next(
        (line for line in block.splitlines() if line and not line.startswith(("import", "from"))),
        "block",
    )[:40]
    for block in BLOCKS
]


def test_the_readme_has_its_usage_blocks() -> None:
    text = "\n".join(BLOCKS)
    # Plain torch, Hogwild, the parameter server, Lightning and local SGD each have a runnable
    # block.
    needles = ("AsyncMomentumSGD(", "train_hogwild(", "launch_local(", "pl.Trainer(", "sync_every=")
    needles += ("AsyncParameterServerStrategy(",)
    for needle in needles:
        assert needle in text, needle


@pytest.mark.parametrize("block", BLOCKS, ids=IDS)
def test_a_readme_block_runs_as_shown(block: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    # A block that shows its output in comments prints exactly that.
    expected = [line[2:] for line in block.splitlines() if line.startswith("# ") and "=" in line]
    printed = done.stdout.splitlines()
    for line in expected:
        assert line in printed, (line, printed)
    # Output fit for a log (this one is not a terminal): no bar redrawn with carriage returns,
    # no advice that does not apply, no transport noise on a clean exit, no warning twice.
    output = done.stdout + done.stderr
    assert "\r" not in output
    assert "sync_dist" not in output
    assert "pipe closed" not in output.lower()
    warned = [line for line in done.stderr.splitlines() if "Warning" in line]
    assert len(warned) == len(set(warned)), warned
