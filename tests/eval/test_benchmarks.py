"""Benchmarks through lm-evaluation-harness on the model in memory, including base + LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sftlab.eval.benchmarks import BUNDLED_DIR, BenchmarkEval, flatten_results, forgetting, task_config


def test_bundled_task_is_offline_and_balanced():
    cfg = task_config("sftlab_mc")
    data = cfg["dataset_kwargs"]["data_files"]["test"]
    assert data == str(BUNDLED_DIR / "sftlab_mc.jsonl")
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    assert len(rows) == 60 and all(len(r["choices"]) == 4 for r in rows)
    assert sorted({r["answer"] for r in rows}) == [0, 1, 2, 3]
    assert [sum(r["answer"] == k for r in rows) for k in range(4)] == [15, 15, 15, 15]
    assert task_config("mmlu") == "mmlu"


def test_flatten_and_forgetting():
    flat = flatten_results({"t": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "t", "sample_len": 4}})
    assert flat == {"t/acc": 0.5, "t/acc_stderr": 0.1}  # sample_len is bookkeeping, not a score
    base = {
        "benchmarks/t/acc": 0.6,
        "benchmarks/t/acc_stderr": 0.1,
        "benchmarks/t/acc_norm": 0.5,
        "exact_match": 0.9,
    }
    tuned = {
        "benchmarks/t/acc": 0.55,
        "benchmarks/t/acc_stderr": 0.05,
        "benchmarks/t/acc_norm": 0.7,
        "exact_match": 0.1,
    }
    assert forgetting(base, tuned, ["benchmarks"]) == {"benchmarks/t/acc": -0.05}


def _choice_loglik(model, tokenizer, context: str, choice: str) -> float:
    """log P(" choice" | context), split the way lm-eval splits: the context's own tokens, then the rest."""
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx_ids), len(whole))))


@pytest.fixture
def tuned_model(tiny_model):
    """The tiny model with a LoRA adapter whose weights are random (a real, non-identity base + adapter)."""
    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def test_lm_eval_scores_the_adapter_model_in_memory(tuned_model, tokenizer):
    rows = [json.loads(line) for line in (BUNDLED_DIR / "sftlab_mc.jsonl").read_text().splitlines()][:8]
    hits = 0
    for r in rows:
        context = f"Question: {r['question']}\nAnswer:"
        scores = [_choice_loglik(tuned_model, tokenizer, context, c) for c in r["choices"]]
        hits += scores.index(max(scores)) == r["answer"]
    expected = hits / len(rows)
    ctx = SimpleNamespace(model=tuned_model, tokenizer=tokenizer, tag="tuned")
    out = BenchmarkEval(tasks=["sftlab_mc"], limit=8, batch_size=4).run(ctx)
    assert out["sftlab_mc/acc"] == pytest.approx(expected)
    assert {"sftlab_mc/acc", "sftlab_mc/acc_norm", "sftlab_mc/acc_stderr"} <= set(out)
    assert not tuned_model.training
