"""The real entry point, end to end on the tiny model: the run directory contract of DESIGN.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from sftlab.build import load_run
from sftlab.data.formats import split_prompt
from sftlab.errors import SFTLabError
from sftlab.model.generate import generate
from sftlab.model.load import check_available, check_hardware
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    proc = subprocess.run(
        [sys.executable, "train.py", "experiment=smoke", "logger=wandb", f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_run_directory_contract(smoke_run):
    for rel in [
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "config.yaml",
        "metrics.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
        "adapter/tokenizer_config.json",
        "checkpoints/last.ckpt",
        "csv/metrics.csv",
        "eval/generations_base.jsonl",
        "eval/generations_tuned.jsonl",
    ]:
        assert (smoke_run / rel).is_file(), rel
    assert list((smoke_run / "wandb").glob("offline-run-*/run-*.wandb"))
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert set(metrics["eval"]) == {"base", "tuned"}
    assert metrics["eval"]["tuned"]["n"] == 4
    assert (metrics["data"]["train"]["rows"], metrics["data"]["train"]["kept"]) == (800, 800)
    assert metrics["val"]["best_loss"] is not None
    assert metrics["params"]["trainable"] < metrics["params"]["total"]


def test_adapter_loads_on_its_recorded_base_and_reproduces_tuned_outputs(smoke_run):
    adapter_cfg = json.loads((smoke_run / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter_cfg["base_model_name_or_path"])  # loadable as is
    model = PeftModel.from_pretrained(base, smoke_run / "adapter").eval()
    run = load_run(smoke_run)
    generations = smoke_run / "eval" / "generations_tuned.jsonl"
    rows = [json.loads(line) for line in generations.read_text().splitlines()]
    test_file = ROOT / "src/sftlab/resources/iso_dates/test.jsonl"
    test_rows = [json.loads(line) for line in test_file.read_text().splitlines()]
    histories = [split_prompt(r["messages"])[0] for r in test_rows[: len(rows)]]
    outputs = generate(model, run.tokenizer, run.template, histories, max_new_tokens=4)
    assert [o["text"] for o in outputs] == [r["output"] for r in rows]


def test_saved_chat_template_renders_the_training_prompt(smoke_run):
    run = load_run(smoke_run)
    messages = [{"role": "user", "content": "Convert this date to ISO 8601 (YYYY-MM-DD): 5 May 2020"}]
    text = run.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "".join(s.text for s in run.template.generation_prompt(messages))


def test_missing_weights_fail_fast_with_one_message(tiny_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SFTLabError, match=r"model.name_or_path='nobody/no-such-model'.*hf download"):
        check_available("nobody/no-such-model", tiny_cfg.model)


def test_billion_parameter_model_on_cpu_is_refused(tmp_path, tiny_cfg):
    LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32768,
    ).save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).hidden_size == 4096
    if torch.cuda.is_available():
        pytest.skip("the refusal is for CPU-only machines")
    with pytest.raises(SFTLabError, match=r"about 7\.2B parameters"):
        check_hardware(str(tmp_path), tiny_cfg.model)
