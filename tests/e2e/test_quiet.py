"""A run prints no warning its user cannot act on (sftlab.quiet), and a piped run logs its progress."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# What the libraries print unasked: a Python warning ("FutureWarning", "warnings.warn("), a logged one
# ("[WARNING]", "wandb: WARNING"), Lightning's litlogger tip, a deprecation notice.
NOISE = re.compile(r"warn|deprecat|Tip:", re.IGNORECASE)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[str, Path]:
    """experiment=smoke with W&B (offline, not silenced) and its default callbacks, stdout to a pipe."""
    run_dir = tmp_path_factory.mktemp("quiet")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    proc = subprocess.run(
        [sys.executable, "train.py", "experiment=smoke", "logger=wandb", f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**env, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr, run_dir


def test_smoke_run_prints_no_library_warnings(smoke):
    output, _ = smoke
    assert [line for line in output.splitlines() if NOISE.search(line)] == []


def test_a_piped_run_logs_progress_to_its_output_and_train_log(smoke):
    """A line every 30 s (how many depends on the machine's speed) and one at the last of the 4 steps."""
    output, run_dir = smoke
    pattern = r"\[sftlab.training.progress\]\[INFO\] - (step .*)"
    printed = re.findall(pattern, output)
    assert printed == re.findall(pattern, (run_dir / "train.log").read_text())
    assert re.fullmatch(
        r"step 4/4 \(100%\) \| epoch 1/1 \| train/loss \d+\.\d{4} \| [\d,]+ tokens/s"
        r" \| elapsed \d+:\d\d:\d\d \| ETA 0:00:00",
        printed[-1],
    )
