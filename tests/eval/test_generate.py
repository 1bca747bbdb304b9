"""The eval suite on the tiny random model: metrics, evaluator composition, result files (the generation loop
itself is tested in tests/model/test_generate.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sftlab import build
from sftlab.data.tokenize import IGNORE_INDEX, encode_conversations
from sftlab.errors import ConfigError
from sftlab.eval import metrics
from sftlab.eval.generate import GenerationEval
from sftlab.eval.suite import EvalSuite, build_evaluators
from tests.model.test_generate import CONVS


def test_text_metrics_exact_values():
    assert metrics.repeated_ngram_rate("a b c a b c a b c", n=3) == pytest.approx(1 - 3 / 7)
    assert metrics.repeated_ngram_rate("one two", n=3) == 0.0
    preds, refs = ["the cat sat on the mat", "x", "2021-03-05"], ["the cat sat on the mat", "y", "2021-03-15"]
    scores, per_example = metrics.text_metrics(preds, refs)
    assert [row["rougeL"] for row in per_example] == [1.0, 0.0, 0.6667]  # 2 of the 3 words of a date
    assert scores["rougeL"] == pytest.approx(5 / 9, abs=1e-6)  # the mean over examples
    assert [row["chrf"] for row in per_example] == [1.0, 0.0, 0.7348] and "bleu" not in per_example[0]
    assert 0.7348 < scores["chrf"] < 1.0  # pooled n-gram counts, not the mean
    # One call gives the sentence scores: each is what the example scores alone.
    alone = [metrics.text_metrics([p], [r], ["chrf"]) for p, r in zip(preds, refs, strict=True)]
    assert [c["chrf"] for c, _ in alone] == pytest.approx([row["chrf"] for row in per_example], abs=1e-4)
    assert metrics.text_metrics(["a b"], ["a c"], ["rougeL", "bleu"])[1] == [{"rougeL": 0.5}]
    with pytest.raises(ConfigError, match="text_metrics"):
        metrics.text_metrics(["a"], ["a"], ["meteor"])


def test_eval_group_is_composable_and_shared_values_apply():
    cfg = build.compose(["experiment=smoke"], output_dir="/tmp/x")  # sets eval.max_examples / max_new_tokens
    evs = build_evaluators(cfg.eval)
    assert list(evs) == ["generate"]
    assert (evs["generate"].max_examples, evs["generate"].max_new_tokens) == (4, 4)
    assert build_evaluators(build.compose(["eval=none"], output_dir="/tmp/x").get("eval")) == {}
    cfg = build.compose(["eval=[generate]", "+eval.nonsense=1"], output_dir="/tmp/x")
    with pytest.raises(ConfigError, match=r"eval\.nonsense"):
        build_evaluators(cfg.eval)


def test_suite_writes_base_and_tuned_side_by_side(tiny_model, tokenizer, chatml, tmp_path):
    splits = {"test": SimpleNamespace(examples=[], rows=CONVS)}
    ev = GenerationEval(max_new_tokens=3, max_examples=4)
    suite = EvalSuite({"generate": ev}, tokenizer, chatml, splits, tmp_path)
    suite.run(tiny_model, "base")
    results = suite.run(tiny_model, "tuned")
    assert results["base"] == results["tuned"]
    assert results["tuned"]["n"] == 4 and results["tuned"]["no_stop_rate"] == 1.0
    assert results["tuned"]["mean_new_tokens"] == 3.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["delta"]["exact_match"] == 0.0 and set(saved) == {"base", "tuned", "delta", "forgetting"}
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["base"] * 4 + ["tuned"] * 4
    assert rows[0]["reference"] == "1991-03-11" and "rougeL" in rows[0] and rows[2]["prompt"] == "Another?"


def test_labels_of_reference_are_supervised(tokenizer, chatml):
    """The premise of exact match: the reference plus end-of-turn is exactly what training targets."""
    enc = encode_conversations([CONVS[0]], chatml, tokenizer)[0]
    targets = [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(targets) == "1991-03-11<|im_end|>"


def test_every_option_instantiates_and_runs_in_stage_order():
    cfg = build.compose(["eval=[benchmarks,judge,error_analysis,generate,loss,mmlu]"], output_dir="/tmp/x")
    evs = build_evaluators(cfg.eval)
    assert list(evs) == ["loss", "generate", "judge", "error_analysis", "benchmarks", "mmlu"]
    assert evs["judge"].criteria.keys() == {"correctness", "helpfulness", "tone", "safety"}
    assert evs["mmlu"].tasks == ["mmlu"] and evs["benchmarks"].tasks == ["sftlab_mc"]


def test_generations_without_generate_follow_the_judge_limit(tokenizer, chatml):
    from sftlab.eval.analysis import ErrorAnalysis
    from sftlab.eval.judge import JudgeEval

    judge_only = EvalSuite({"judge": JudgeEval(max_examples=7)}, tokenizer, chatml, {}, "/tmp/x")
    assert judge_only.generation.max_examples == 7 and judge_only.generation.split == "test"
    evaluators = {"judge": JudgeEval(max_examples=7), "error_analysis": ErrorAnalysis()}
    both = EvalSuite(evaluators, tokenizer, chatml, {}, "/tmp/x")
    assert both.generation.max_examples is None


def test_generating_evals_on_plain_text_documents_are_refused_before_evaluation(tokenizer, chatml):
    from sftlab.eval.judge import JudgeEval
    from sftlab.eval.loss import LossEval

    documents = {"test": SimpleNamespace(examples=[], rows=["A document.", "Another one."])}
    for evaluators in ({"generate": GenerationEval()}, {"loss": LossEval(), "judge": JudgeEval()}):
        with pytest.raises(ConfigError, match=r"eval=(generate|judge) answers the prompts of the 'test'"):
            EvalSuite(evaluators, tokenizer, chatml, documents, "/tmp/x")
    EvalSuite({"loss": LossEval()}, tokenizer, chatml, documents, "/tmp/x")  # loss needs no prompt


def test_exact_match_compares_the_final_answer_of_a_reasoning_output():
    from sftlab.eval.generate import make_record

    history = [{"role": "user", "content": "2+2?"}]
    out = {"text": "<think>\nTwo and two.\n</think>\n\n4", "stopped": True, "new_tokens": 9}
    stripped = make_record(0, history, "4", out)
    assert (stripped["output"], stripped["answer"], stripped["reasoning"]) == ("4", "4", "Two and two.")
    assert stripped["exact_match"] is True
    shown = make_record(0, history, "4", out, reasoning="show")
    assert shown["output"] == out["text"] and shown["exact_match"] is True
    cut = make_record(0, history, "4", {"text": "<think>\nTwo and", "stopped": False, "new_tokens": 4})
    assert (cut["answer"], cut["exact_match"]) == ("", False)  # still thinking is not an answer
    plain = make_record(0, history, "4", {"text": "4 ", "stopped": True, "new_tokens": 2})
    assert plain["exact_match"] is True and plain["reasoning"] is None
    records = [stripped, cut]
    ctx = SimpleNamespace(records=lambda: records)
    scores = GenerationEval(text_metrics=("chrf",), reasoning="show").run(ctx)
    assert scores["exact_match"] == 0.5 and scores["chrf"] < 1.0
    with pytest.raises(ConfigError, match=r"eval\.generate\.reasoning='hide'"):
        GenerationEval(reasoning="hide")


def test_generation_length_follows_the_longest_reference(tokenizer, chatml):
    """max_new_tokens=None: the longest reference (reasoning included) + its end-of-turn + the margin."""
    from sftlab.data.reasoning import REASONING_KEY
    from sftlab.eval.generate import _answer_text

    ev = GenerationEval(new_tokens_margin=5)
    refs = [c[-1]["content"] for c in CONVS]  # the longest: "1991-03-11", 10 tokens (one per digit)
    assert ev.new_tokens_for(refs, tokenizer) == 10 + 1 + 5
    assert ev.new_tokens_for(["Hello!"], tokenizer) == 2 + 1 + 5
    assert GenerationEval(max_new_tokens=7).new_tokens_for(refs, tokenizer) == 7
    reasoned = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", REASONING_KEY: "Two and two."},
    ]
    assert _answer_text(reasoned) == "<think>\nTwo and two.\n</think>\n\n4"
    assert ev.new_tokens_for([_answer_text(reasoned)], tokenizer) > ev.new_tokens_for(["4"], tokenizer)


def test_the_suite_evaluates_in_the_training_precision(lively_model, tokenizer, chatml, tmp_path):
    """eval_precision=auto: generation runs under the trainer's bf16 autocast, token for token what
    generating under that autocast gives, and not what fp32 gives (the weights are large enough to tell)."""
    import torch

    splits = {"test": SimpleNamespace(examples=[], rows=CONVS)}
    ev = GenerationEval(max_new_tokens=8)
    cfg = build.compose(["model=tiny_random", "trainer.precision=bf16-mixed"])
    autocast = build.eval_autocast(cfg.eval_precision, cfg.trainer.precision)
    assert autocast is torch.bfloat16
    suite = EvalSuite({"generate": ev}, tokenizer, chatml, splits, tmp_path, autocast)
    suite.run(lively_model, "tuned")
    got = [r["output"] for r in suite.records["tuned"]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert got == [r["output"] for r in ev.generate_records(lively_model, tokenizer, chatml, CONVS)]
    assert got != [r["output"] for r in ev.generate_records(lively_model, tokenizer, chatml, CONVS)]


@pytest.mark.parametrize(
    ("choice", "training", "dtype"),
    [
        ("auto", "bf16-mixed", "bfloat16"),
        ("auto", "32-true", None),
        ("32", "bf16-mixed", None),
        (32, "bf16-mixed", None),
        ("16-mixed", "32", "float16"),
        ("auto", "bf16-true", None),
    ],
)
def test_eval_precision_choices(choice, training, dtype):
    import torch

    assert build.eval_autocast(choice, training) == (dtype and getattr(torch, dtype))


def test_eval_precision_auto_follows_a_training_precision_of_auto_as_resolved_here():
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU rule")
    bf16_cpu = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert build.eval_autocast("auto", "auto") == (torch.bfloat16 if bf16_cpu else None)
