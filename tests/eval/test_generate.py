"""Generation and the eval suite on the tiny random model: batching, prompts, metrics, result files."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from sftlab import build
from sftlab.data.formats import split_prompt
from sftlab.data.tokenize import IGNORE_INDEX, encode_conversations, encode_prompt
from sftlab.errors import ConfigError
from sftlab.eval import metrics
from sftlab.eval.generate import GenerationEval
from sftlab.eval.suite import EvalSuite, build_evaluators
from sftlab.model.generate import generate, stop_token_ids

CONVS = [
    [
        {"role": "user", "content": "Convert this date to ISO 8601 (YYYY-MM-DD): 11 March 1991"},
        {"role": "assistant", "content": "1991-03-11"},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": "Name a colour, and then explain at some length why you picked that one.",
        },
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Red."},
    ],
    [{"role": "user", "content": "2048, January 31 -> ISO?"}, {"role": "assistant", "content": "2048-01-31"}],
    [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}],
]


@pytest.fixture
def lively_model(tiny_model):
    """The tiny model with larger seeded random weights: its greedy outputs differ from prompt to prompt (the
    stock init answers every prompt with newlines, which would make batched == one-by-one trivially true)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tiny_model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return tiny_model


def test_batched_greedy_equals_one_by_one(lively_model, tokenizer, chatml):
    histories = [split_prompt(c)[0] for c in CONVS]
    lengths = {len(encode_prompt(h, chatml, tokenizer)) for h in histories}
    assert len(lengths) == len(histories)  # every row but the longest is really left-padded
    one = generate(lively_model, tokenizer, chatml, histories, max_new_tokens=12, batch_size=1)
    batched = generate(lively_model, tokenizer, chatml, histories, max_new_tokens=12, batch_size=8)
    assert batched == one
    assert len({o["text"] for o in one}) == len(histories)


def _manual_greedy(model, prefix: list[int], steps: int, stops: list[int]) -> list[int]:
    ids, out = torch.tensor([prefix]), []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("conv", [CONVS[0], CONVS[2]], ids=["single_turn", "multi_turn_system"])
def test_generation_prompt_is_the_training_prefix(lively_model, tokenizer, chatml, conv):
    """The ids generation feeds the model are the training tokens before the last response, whose first
    supervised label is the first response token; decoding from that exact prefix gives generate()'s text."""
    history, reference = split_prompt(conv)
    train = encode_conversations([conv], chatml, tokenizer)[0]
    prompt = encode_prompt(history, chatml, tokenizer)
    assert train.input_ids[: len(prompt)] == prompt
    first_response = tokenizer(reference, add_special_tokens=False)["input_ids"][0]
    assert train.labels[len(prompt)] == first_response
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    stops = stop_token_ids(chatml, tokenizer)
    assert stops == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    expected = _manual_greedy(lively_model, train.input_ids[: len(prompt)], 10, stops)
    got = generate(lively_model, tokenizer, chatml, [history], max_new_tokens=10)[0]
    assert got["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert got["new_tokens"] == len(expected) + got["stopped"]


def test_stops_at_the_templates_end_of_turn_and_reports_no_stop(lively_model, tokenizer, chatml):
    """Generation ends at the template's stop token (excluded from the text); without one it runs to
    max_new_tokens and is reported as not stopped."""
    history = split_prompt(CONVS[1])[0]
    prompt = encode_prompt(history, chatml, tokenizer)
    free = generate(lively_model, tokenizer, chatml, [history], max_new_tokens=6)[0]
    expected = _manual_greedy(lively_model, prompt, 6, stops=[])
    text = tokenizer.decode(expected, skip_special_tokens=True)
    assert free == {"text": text, "stopped": False, "new_tokens": 6}
    stop = expected[2]  # pretend the third greedy token is this template's end-of-turn marker
    assert stop not in expected[:2]
    template = dataclasses.replace(chatml, stop_strings=[tokenizer.decode([stop])])
    assert stop in stop_token_ids(template, tokenizer)
    out = generate(lively_model, tokenizer, template, [history], max_new_tokens=6)[0]
    text = tokenizer.decode(expected[:2], skip_special_tokens=True)
    assert out == {"text": text, "stopped": True, "new_tokens": 3}


def test_text_metrics_exact_values():
    assert metrics.repeated_ngram_rate("a b c a b c a b c", n=3) == pytest.approx(1 - 3 / 7)
    assert metrics.repeated_ngram_rate("one two", n=3) == 0.0
    scores = metrics.corpus_text_metrics(["the cat sat on the mat", "x"], ["the cat sat on the mat", "y"])
    assert scores["rougeL"] == pytest.approx(0.5) and scores["chrf"] < 1.0
    same = metrics.corpus_text_metrics(["2021-03-05"], ["2021-03-05"], ["chrf"])
    assert same == {"chrf": pytest.approx(1.0)}
    assert metrics.per_example_text_metrics(["a b"], ["a c"], ["rougeL", "bleu"]) == [{"rougeL": 0.5}]
    with pytest.raises(ConfigError, match="text_metrics"):
        metrics.corpus_text_metrics(["a"], ["a"], ["meteor"])


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
