"""A run prints no warning its user cannot act on (sftlab.cli.quiet), and a piped run logs its progress."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# What the libraries print unasked: a Python warning ("FutureWarning", "warnings.warn("), a logged one
# ("[WARNING]", "wandb: WARNING"), Lightning's litlogger tip, a deprecation notice.
NOISE = re.compile(r"warn|deprecat|Tip:", re.IGNORECASE)


@pytest.fixture(scope="module")
def smoke_output(tmp_path_factory) -> str:
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
    return proc.stdout + proc.stderr


def test_smoke_run_prints_no_library_warnings(smoke_output):
    assert [line for line in smoke_output.splitlines() if NOISE.search(line)] == []


def test_a_piped_run_logs_a_progress_line_at_the_last_step(smoke_output):
    lines = [line for line in smoke_output.splitlines() if "[sftlab.training.progress][INFO] - step " in line]
    assert len(lines) == 1 and "step 4/4 (100%) | epoch 1/1 | train/loss " in lines[0]
