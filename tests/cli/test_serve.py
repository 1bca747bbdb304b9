"""sftlab-serve answers the official `openai` client exactly as sftlab's own greedy generation would, and
survives its clients: OpenAI's parameter checks, size and context limits, a bounded queue with 503s."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
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


MAX_BODY = 20_000


@pytest.fixture(scope="module")
def url(run_dir):
    """The real console entry point on a free port; the bound URL is read from its first stdout line. One
    request may wait while one generates (queue=1), so the queue tests need no crowd."""
    with served(run_dir, "tiny", queue=1, max_body_bytes=MAX_BODY, max_tokens=2000) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def post(url: str, body: object, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", json=body, timeout=120, **kwargs)


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


def test_health_answers_with_the_model_and_its_limits(url):
    r = httpx.get(url.removesuffix("/v1") + "/health", timeout=30)
    assert r.status_code == 200
    assert r.json() == {
        "status": "ok",
        "model": "tiny",
        "generating": False,
        "pending": 0,
        "queue": 1,
        "context_length": 2048,
    }


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 2}, "top_p"),
        ({"seed": "x"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"n": 2}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(url, change, param):
    r = post(url, {"model": "tiny", "messages": QUESTION, "max_tokens": 2} | change)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"{not json", b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_400(url, raw):
    r = httpx.post(f"{url}/chat/completions", content=raw, timeout=30)
    assert r.status_code == 400 and "error" in r.json()


def test_a_body_over_the_limit_is_413(url):
    big = [{"role": "user", "content": "x" * MAX_BODY}]
    r = post(url, {"model": "tiny", "messages": big})
    assert r.status_code == 413 and str(MAX_BODY) in r.json()["error"]["message"]


def test_prompt_and_max_tokens_beyond_the_context_are_400(url, client):
    long = [{"role": "user", "content": "hello " * 2100}]  # about 2,100 tokens; the context is 2,048
    r = post(url, {"model": "tiny", "messages": long})
    assert r.status_code == 400 and "maximum context length is 2048 tokens" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2040)


def test_a_full_queue_answers_503_at_once_and_the_queued_request_is_served(url):
    """One long generation runs, one request may wait (queue=1): of five more sent meanwhile, one waits and
    is answered, four get 503 with Retry-After at once."""
    health = url.removesuffix("/v1") + "/health"
    long = {"model": "tiny", "messages": QUESTION, "max_tokens": 100, "temperature": 1.0, "seed": 0}
    results: dict = {}
    runner = threading.Thread(target=lambda: results.setdefault("long", post(url, long)))
    runner.start()
    deadline = time.monotonic() + 60
    while not httpx.get(health, timeout=30).json()["generating"]:
        assert time.monotonic() < deadline, "the long request never started generating"
        time.sleep(0.02)
    started = time.monotonic()
    short = {"model": "tiny", "messages": QUESTION, "max_tokens": 2, "temperature": 0}
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: (post(url, short), time.monotonic() - started), range(5)))
    runner.join(timeout=120)
    assert results["long"].status_code == 200
    assert results["long"].json()["usage"]["completion_tokens"] == 100  # it really was generating all along
    statuses = sorted(r.status_code for r, _ in answers)
    assert statuses == [200, 503, 503, 503, 503]
    busy = [(r, t) for r, t in answers if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"] for r, _ in busy)
    assert max(t for _, t in busy) < min(t for r, t in answers if r.status_code == 200)  # 503s came first


def test_fifty_concurrent_clients_get_answers_or_503_never_a_reset(url):
    """A bounded load test on loopback: 50 clients at once, each gets an HTTP answer within 60 s."""
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 3, "temperature": 0}
    start = time.monotonic()
    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(lambda _: post(url, body), range(50)))  # a reset would raise here
    assert time.monotonic() - start < 60
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(200) >= 2, codes
    first = next(r for r in responses if r.status_code == 200)
    assert first.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_merged_directory_is_routed_to_vllm_and_transformers_serve(tmp_path):
    from sftlab.cli.serve import engine_commands

    merged = tmp_path / "merged"
    assert engine_commands(merged, "iso") == [
        f"vllm serve {merged} --served-model-name iso --chat-template {merged}/chat_template.jinja",
        f"transformers serve {merged}",
    ]


def test_reasoning_is_returned_apart_from_the_answer_as_reasoning_content():
    from sftlab.cli.serve import answer_deltas, message

    text = "<think>\n2 and 2 make 4.\n</think>\n\nIt is 4."
    assert message(text, "separate") == {
        "role": "assistant",
        "content": "It is 4.",
        "reasoning_content": "2 and 2 make 4.",
    }
    assert message(text, "show") == {"role": "assistant", "content": text}
    assert message("Just 4.", "separate") == {"role": "assistant", "content": "Just 4."}
    pieces = ["<th", "ink>\n2 and 2", " make 4.\n</think>", "\n\nIt is", " 4."]
    deltas = [(p, "stop" if k == len(pieces) - 1 else None, k) for k, p in enumerate(pieces)]
    assert "".join(d for d, _ in answer_deltas(iter(deltas), "separate")) == "It is 4."
    assert [r for _, r in answer_deltas(iter(deltas), "separate")][-1] == "stop"
    assert "".join(d for d, _ in answer_deltas(iter(deltas), "show")) == text
