"""The real default run (`python train.py`) on SmolLM2-135M-Instruct: it learns the task. Slow (~5 min)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from sftlab.build import load_run
from sftlab.data.formats import split_prompt
from sftlab.model.generate import generate
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("default")
    proc = subprocess.run(
        [sys.executable, "train.py", f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout + proc.stderr


def test_default_run_teaches_the_task(default_run):
    run_dir, output = default_run
    evals = json.loads((run_dir / "metrics.json").read_text())["eval"]
    assert evals["base"]["exact_match"] <= 0.2
    assert evals["tuned"]["exact_match"] >= 0.9
    assert "base vs tuned" in output and "wandb sync" in output


def test_default_adapter_reproduces_tuned_outputs_on_its_recorded_base(default_run):
    run_dir, _ = default_run
    base_dir = json.loads((run_dir / "adapter/adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), run_dir / "adapter"
    ).eval()
    run = load_run(run_dir)
    rows = [json.loads(line) for line in (run_dir / "eval/generations_tuned.jsonl").read_text().splitlines()][
        :16
    ]
    tests = [
        json.loads(line)
        for line in (ROOT / "src/sftlab/resources/iso_dates/test.jsonl").read_text().splitlines()
    ]
    histories = [split_prompt(r["messages"])[0] for r in tests[: len(rows)]]
    outputs = generate(model, run.tokenizer, run.template, histories, max_new_tokens=32)
    # Training evaluated in the trainer's precision; fp32 here may flip a rare near-tie, so allow one.
    same = sum(o["text"] == r["output"] for o, r in zip(outputs, rows, strict=True))
    assert same >= len(rows) - 1
