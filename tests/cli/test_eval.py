"""`sftlab-eval` on a finished run: the Hydra app end to end, base (adapter disabled) vs tuned."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model

from sftlab import build
from sftlab.build import load_run
from sftlab.data.formats import split_prompt
from sftlab.model.generate import generate
from sftlab.rundir import write
from tests.conftest import ROOT


def make_adapter_run(run_dir: Path, tiny_cfg, tiny_model_dir: str, tokenizer, template) -> Path:
    """A run directory as train.py writes it (config.yaml + adapter/), with random, non-zero LoRA weights so
    that the tuned model answers differently from its base."""
    from sftlab.model.load import load_model

    cfg = build.compose(["experiment=smoke"], output_dir=run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    model = get_peft_model(
        load_model(tiny_cfg.model, tiny_model_dir),
        LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2)
    write.save_model(run_dir, model, tokenizer, template)
    return run_dir


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_cfg, tiny_model_dir, tokenizer, chatml) -> Path:
    return make_adapter_run(tmp_path_factory.mktemp("run"), tiny_cfg, tiny_model_dir, tokenizer, chatml)


def test_sftlab_eval_compares_base_and_tuned(adapter_run):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sftlab.cli.eval",
            f"run={adapter_run}",
            "eval=[error_analysis,generate]",
            "eval.generate.max_examples=3",
            "eval.generate.max_new_tokens=6",
            "wandb=true",  # the tables also go to a W&B run (offline here)
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "base vs tuned" in proc.stdout and "error_analysis/no_stop_rate" in proc.stdout
    (out,) = (adapter_run / "evals").iterdir()  # a folder of its own; the training-time eval/ is untouched
    assert not (adapter_run / "eval").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["tuned"]["n"] == 3 and results["base"]["n"] == 3
    assert set(results["delta"]) >= {"exact_match", "rougeL", "error_analysis/refusal_rate"}
    lines = (out / "generations.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["model"] for r in rows] == ["base"] * 3 + ["tuned"] * 3
    assert all("errors" in r for r in rows) and (out / "worst_tuned.md").is_file()
    assert list(out.rglob("offline-run-*/run-*.wandb"))

    # the tuned rows are the adapter model's greedy outputs, the base rows those of the model without it,
    # in the run's training precision (eval_precision=auto)
    run = load_run(adapter_run)
    test_file = ROOT / "src/sftlab/resources/iso_dates/test.jsonl"
    tests = [json.loads(line) for line in test_file.read_text().splitlines()[:3]]
    histories = [split_prompt(t["messages"])[0] for t in tests]
    dtype = build.eval_autocast("auto", run.cfg.trainer.precision)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        tuned = generate(run.model, run.tokenizer, run.template, histories, max_new_tokens=6)
        with run.model.disable_adapter():
            base = generate(run.model, run.tokenizer, run.template, histories, max_new_tokens=6)
    assert [r["output"] for r in rows[3:]] == [o["text"] for o in tuned]
    assert [r["output"] for r in rows[:3]] == [o["text"] for o in base]
    assert [o["text"] for o in base] != [o["text"] for o in tuned]


def test_sftlab_eval_refuses_a_directory_that_is_not_a_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sftlab.cli.eval", f"run={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "no config.yaml there" in proc.stdout + proc.stderr
