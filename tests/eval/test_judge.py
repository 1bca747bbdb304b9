"""LLM-as-judge: verdict parsing, and real judging by a local model and by `sftlab-serve` on loopback.

The judge model is the tiny random Llama trained (seconds) until it answers two rubric prompts, one per
answer, with two different verdicts; it is then saved as a full-model run directory (config.yaml + model/),
which both the `hf` backend (its model/ path) and `sftlab-serve` (the run) load. Scores that come back
therefore prove the prompt reached the model intact (the verdict depends on the answer in it), the model's
reply came back, and the parser read it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sftlab import build
from sftlab.data.tokenize import encode_prompt
from sftlab.errors import ConfigError
from sftlab.eval.judge import DEFAULT_PROMPT, JudgeEval, aggregate, parse_verdict, render_prompt
from tests.helpers import serve

CRITERIA = {"correctness": "Is the answer right?"}
PROMPT = "Grade {answer} against {reference}."  # short, so the judge trains in seconds
RECORDS = [
    {"prompt": "Convert 11 March 1991 to ISO 8601.", "reference": "1991-03-11", "output": out}
    for out in ("1991-03-11", "banana")
]
VERDICTS = [
    '{"correctness": 5, "unsupported_claims": false, "reason": "Matches."}',
    '{"correctness": 1, "unsupported_claims": true, "reason": "Wrong."}',
]


def test_parse_verdict_json_prose_and_fallback():
    text = 'Sure! {"correctness": 4, "tone": 5, "unsupported_claims": true, "reason": " Close. "} Done.'
    assert parse_verdict(text, ["correctness", "tone"], [1, 5]) == {
        "scores": {"correctness": 4.0, "tone": 5.0},
        "unsupported_claims": True,
        "reason": "Close.",
        "error": None,
    }
    loose = parse_verdict("Correctness: 3\ntone = 2.5\nThe answer is fine.", ["correctness", "tone"], [1, 5])
    assert loose["scores"] == {"correctness": 3.0, "tone": 2.5} and loose["error"] is None
    bad = parse_verdict('{"correctness": 9}', ["correctness", "safety"], [1, 5])
    assert bad["scores"] == {} and bad["error"] == "no valid 1-5 score for correctness, safety"
    assert parse_verdict('{"correctness": true}', ["correctness"], [1, 5])["error"] is not None


def test_aggregate_mean_spread_and_failures():
    verdicts = [
        parse_verdict(t, ["c"], [1, 5])
        for t in ('{"c": 5, "unsupported_claims": false}', '{"c": 3, "unsupported_claims": true}', "no idea")
    ]
    assert aggregate(verdicts, ["c"]) == {
        "n": 3,
        "parse_failures": 1,
        "c_mean": 4.0,
        "c_std": 1.0,
        "score_mean": 4.0,
        "score_std": 1.0,
        "unsupported_rate": 0.5,
    }
    assert aggregate(verdicts[2:], ["c"]) == {"n": 1, "parse_failures": 1}


def test_rubric_prompt_names_every_criterion_and_keeps_json_braces():
    text = render_prompt(
        DEFAULT_PROMPT,
        criteria={"correctness": "Right?", "tone": "Nice?"},
        scale=[1, 5],
        question="Q?",
        reference="",
        answer="A.",
    )
    assert "- correctness: Right?\n- tone: Nice?" in text and "from 1 (worst) to 5 (best)" in text
    assert '{"correctness": 5, "tone": 5, "unsupported_claims": false, "reason": "one sentence"}' in text
    assert text.endswith("[Question]\nQ?\n\n[Reference answer]\n(none)\n\n[Assistant's answer]\nA.")


def test_bad_judge_settings_are_refused():
    with pytest.raises(ConfigError, match=r"eval\.judge\.backend"):
        JudgeEval(backend="anthropic")
    with pytest.raises(ConfigError, match=r"eval\.judge\.scale"):
        JudgeEval(scale=[5, 1])
    with pytest.raises(ConfigError, match=r"eval\.judge\.base_url"):
        JudgeEval(backend="openai", model="m").client()


def _fit(model, sequences: list[tuple[list[int], list[int]]], max_steps: int = 400) -> None:
    """Train until greedy decoding reproduces every target (teacher-forced argmax, checked before a step)."""
    width = max(len(p) + len(t) for p, t in sequences)
    inputs = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100)
    for row, (p, t) in enumerate(sequences):
        inputs[row, : len(p) + len(t)] = torch.tensor(p + t)
        labels[row, len(p) : len(p) + len(t)] = torch.tensor(t)
    targets = labels[:, 1:]
    mask = targets != -100
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(max_steps):
        hidden = model.model(input_ids=inputs).last_hidden_state[:, :-1][mask]
        logits = model.lm_head(hidden)
        if bool((logits.argmax(-1) == targets[mask]).all()):
            return
        opt.zero_grad()
        F.cross_entropy(logits, targets[mask]).backward()
        opt.step()
    raise AssertionError("the judge model did not fit its verdicts")


@pytest.fixture(scope="module")
def judge_run(request, tmp_path_factory, tiny_cfg, tiny_model_dir, tokenizer, chatml) -> Path:
    """A full-model run directory whose model answers the two judge prompts with VERDICTS (cached by
    content in pytest's cache dir, so only the first run pays the seconds of training)."""
    from sftlab.model.load import load_model

    judge = JudgeEval(criteria=CRITERIA, prompt=PROMPT)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sequences = [
        (
            encode_prompt([{"role": "user", "content": p}], chatml, tokenizer),
            tokenizer(v, add_special_tokens=False)["input_ids"] + [im_end],
        )
        for p, v in zip(judge.prompts(RECORDS), VERDICTS, strict=True)
    ]
    key = hashlib.sha256(json.dumps([sequences, tiny_model_dir, torch.__version__]).encode()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider: train every time
    run = cache.mkdir(f"sftlab-judge-{key}") if cache else tmp_path_factory.mktemp("judge")
    if not (run / "model" / "config.json").is_file():
        model = load_model(tiny_cfg.model, tiny_model_dir)
        _fit(model, sequences)
        cfg = build.compose(["model=tiny_random", "adapter=none", "logger=csv"], output_dir=run)
        (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        model.save_pretrained(run / "model")
        tok = copy.deepcopy(tokenizer)  # the fixture is shared by the session
        tok.chat_template = chatml.to_jinja()  # as train.py saves it: the hf judge renders prompts alike
        tok.save_pretrained(run / "model")
    return run


def _check_verdicts(records: list[dict], stats: dict) -> None:
    assert [r["judge"]["scores"] for r in records] == [{"correctness": 5.0}, {"correctness": 1.0}]
    assert [r["judge"]["unsupported_claims"] for r in records] == [False, True]
    assert [r["judge"]["reason"] for r in records] == ["Matches.", "Wrong."]
    assert stats == {
        "n": 2,
        "parse_failures": 0,
        "correctness_mean": 3.0,
        "correctness_std": 2.0,
        "score_mean": 3.0,
        "score_std": 2.0,
        "unsupported_rate": 0.5,
    }


def test_local_judge_model_scores_answers(judge_run):
    judge = JudgeEval(
        backend="hf", model=str(judge_run / "model"), criteria=CRITERIA, prompt=PROMPT, max_new_tokens=40
    )
    records = [dict(r) for r in RECORDS]
    verdicts = judge.judge_records(records)
    _check_verdicts(records, aggregate(verdicts, list(CRITERIA)))
    assert records[0]["judge"]["raw"] == VERDICTS[0]


@pytest.fixture
def served(judge_run):
    """`sftlab-serve` on a free loopback port, serving the judge run; stopped after the test."""
    with serve.served(judge_run, "judge") as url:
        yield url


def test_openai_compatible_judge_against_sftlab_serve(served, monkeypatch):
    monkeypatch.setenv("SFTLAB_TEST_JUDGE_KEY", "not-a-secret")  # sent as a bearer token, ignored by serve
    judge = JudgeEval(
        backend="openai",
        base_url=served,
        model="judge",
        api_key_env="SFTLAB_TEST_JUDGE_KEY",
        criteria=CRITERIA,
        prompt=PROMPT,
        max_new_tokens=40,
        timeout_s=60,
    )
    records = [dict(r) for r in RECORDS]
    verdicts = judge.judge_records(records)
    _check_verdicts(records, aggregate(verdicts, list(CRITERIA)))
