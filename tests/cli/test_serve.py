"""sftlab-serve answers the official `openai` client exactly as sftlab's own greedy generation would."""

from __future__ import annotations

import shutil

import openai
import pytest
from omegaconf import OmegaConf

from sftlab.build import load_run
from sftlab.cli.serve import parse_request, stream_text
from sftlab.data.tokenize import encode_prompt
from sftlab.model.generate import generate, stream_ids
from tests.conftest import make_adapter_run
from tests.helpers.serve import served

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_adapter_run(tmp_path_factory.mktemp("serve"), [])[0]


@pytest.fixture(scope="module")
def client(run_dir):
    """The real console entry point on a free port; the bound URL is read from its first stdout line."""
    with served(run_dir, "tiny") as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(run_dir):
    run = load_run(run_dir)
    return generate(run.model, run.tokenizer, run.template, [QUESTION], max_new_tokens=10)[0]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_chat_completion_equals_greedy_generation(client, expected):
    r = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=10)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected["text"]
    assert r.choices[0].finish_reason == ("stop" if expected["stopped"] else "length")
    assert r.usage.completion_tokens == expected["new_tokens"] - expected["stopped"]


def test_streaming_chunks_join_to_the_same_text(client, expected):
    stream = client.chat.completions.create(
        model="tiny", messages=QUESTION, temperature=0, max_tokens=10, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_string_cuts_the_answer(client, expected):
    text = expected["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"greedy text {text!r} too short for this test"
    r = client.chat.completions.create(
        model="tiny", messages=QUESTION, temperature=0, max_tokens=10, stop=[stop]
    )
    assert r.choices[0].message.content == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client, expected):
    def ask(seed: int) -> str:
        r = client.chat.completions.create(
            model="tiny", messages=QUESTION, temperature=1.0, max_tokens=10, seed=seed
        )
        return r.choices[0].message.content

    assert ask(seed=1) == ask(seed=1) != expected["text"]


def test_bad_request_is_a_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])


def test_generation_stops_at_the_templates_end_of_turn_token(run_dir, tmp_path):
    """Make a token the model really emits mid-answer the template's end-of-turn marker: the answer must end
    right before it, without it, with finish_reason "stop"."""
    run = load_run(run_dir)
    prompt = encode_prompt(QUESTION, run.template, run.tokenizer)
    out = list(stream_ids(run.model, prompt, stops=[], max_new_tokens=10))  # greedy, never stopping
    tok = run.tokenizer
    k, marker = next(
        (k, tok.decode([t]))
        for k, t in enumerate(out)
        if k >= 1 and t not in out[:k] and tok(tok.decode([t]), add_special_tokens=False)["input_ids"] == [t]
    )
    shutil.copytree(run_dir, tmp_path / "run")
    cfg = OmegaConf.load(tmp_path / "run" / "config.yaml")
    cfg.template.stop_strings = [marker]
    OmegaConf.save(cfg, tmp_path / "run" / "config.yaml")
    stopped = load_run(tmp_path / "run")
    req = parse_request({"messages": QUESTION, "temperature": 0, "max_tokens": 10}, stopped, cap=512)
    parts = list(stream_text(stopped, req))
    assert "".join(p[0] for p in parts) == tok.decode(out[:k], skip_special_tokens=True)
    assert parts[-1][1:] == ("stop", k)
