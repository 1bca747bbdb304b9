"""Error analysis and the loss evaluator: exact counts on hand-made records, exact loss on the tiny model."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sftlab.data.tokenize import IGNORE_INDEX, encode_conversations
from sftlab.eval.analysis import REFUSAL_PHRASES, ErrorAnalysis, example_flags, is_refusal
from sftlab.eval.generate import GenerationEval
from sftlab.eval.loss import LossEval
from sftlab.eval.suite import EvalContext


def _rec(i, output, reference, *, stopped=True, rouge=None, judge=None):
    rec = {
        "index": i,
        "prompt": f"q{i}",
        "reference": reference,
        "output": output,
        "stopped": stopped,
        "exact_match": output.strip().lower() == reference.strip().lower(),
    }
    if rouge is not None:
        rec["rougeL"] = rouge
    if judge is not None:
        rec["judge"] = judge
    return rec


RECORDS = [
    _rec(0, "2021-03-05", "2021-03-05", rouge=1.0),
    _rec(1, "I'm sorry, I cannot help with that.", "2020-01-01", rouge=0.0),
    _rec(
        2,
        "the the the the the the the the",
        "1999-12-31",
        stopped=False,
        rouge=0.0,
        judge={"unsupported_claims": True, "scores": {"correctness": 1.0}, "reason": "Loops."},
    ),
    _rec(3, "2021-03-06", "2021-03-05", rouge=0.6, judge={"unsupported_claims": False}),
]


def test_refusal_detector():
    assert is_refusal("I\u2019m sorry, but no.", REFUSAL_PHRASES)
    assert is_refusal("As an AI language model I cannot", REFUSAL_PHRASES)
    assert not is_refusal("2021-03-05", REFUSAL_PHRASES)


def test_example_flags_exact():
    flags = example_flags(
        RECORDS[2], ngram=3, repetition_threshold=0.2, mismatch_rouge=0.5, phrases=REFUSAL_PHRASES
    )
    assert flags == {
        "repetitive": True,
        "no_stop": True,
        "refusal": False,
        "mismatch": True,
        "judge_unsupported": True,
        "repeated_ngram_rate": round(1 - 1 / 6, 4),
        "badness": 5.0,
    }
    near = example_flags(RECORDS[3], ngram=3, repetition_threshold=0.2, mismatch_rouge=0.5, phrases=[])
    assert near["mismatch"] is False and near["badness"] == 0.4  # close to the reference: not a mismatch


def test_error_analysis_counts_and_worst_examples(tmp_path):
    ctx = EvalContext(
        model=None,
        tokenizer=None,
        template=None,
        splits={},
        tag="tuned",
        out_dir=tmp_path,
        generation=GenerationEval(),
        _records=[dict(r) for r in RECORDS],
    )
    out = ErrorAnalysis(worst_k=2).run(ctx)
    assert out == {
        "repeated_ngram_rate": pytest.approx((1 - 1 / 6) / 4),
        "repetitive_rate": 0.25,
        "no_stop_rate": 0.25,
        "refusal_rate": 0.25,
        "reference_mismatch_rate": 0.5,
        "judge_unsupported_rate": 0.5,
        "n": 4,
    }
    worst = (tmp_path / "worst_tuned.md").read_text()
    assert worst.index("example 2: repetitive, no_stop, mismatch, judge_unsupported") < worst.index(
        "example 1: refusal, mismatch"
    )
    assert "example 0" not in worst and "**Judge:** {'correctness': 1.0} Loops." in worst
    out = ErrorAnalysis(worst_k=10).run(ctx)  # only wrong answers are listed, however many are asked for
    assert (tmp_path / "worst_tuned.md").read_text().count("## ") == 3


def test_loss_eval_is_the_mean_token_loss_over_the_split(tiny_model, tokenizer, chatml):
    convs = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in [("Hi", "Hello!"), ("Convert 1 May 2020 to ISO 8601", "2020-05-01"), ("2+2?", "4")]
    ]
    examples = encode_conversations(convs, chatml, tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:  # one at a time, no padding: the reference value
            logits = tiny_model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1]
            labels = torch.tensor(ex.labels[1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    splits = {"val": SimpleNamespace(examples=examples, rows=convs)}
    ctx = EvalContext(tiny_model, tokenizer, chatml, splits, "base", Path("/nonexistent"), GenerationEval())
    out = LossEval(batch_size=3).run(ctx)
    assert out["target_tokens"] == count and out["n"] == 3
    assert out["loss"] == pytest.approx(total / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
