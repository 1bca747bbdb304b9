"""The review app over HTTP (Starlette's test client): resume, blindness, the reveal, refused ratings."""

from __future__ import annotations

import re

import pytest
from starlette.testclient import TestClient

from sftlab.review.items import Rubric, build_review_set
from sftlab.review.server import create_app, loopback_hosts
from sftlab.review.storage import RatingLog
from tests.review.conftest import write_run
from tests.review.test_items import rows


@pytest.fixture
def setup(tmp_path):
    r = rows(write_run(tmp_path, 3))
    review = build_review_set(
        r["base"], r["tuned"], labels=("base", "tuned"), sources={}, seed=0, rubric=Rubric()
    )
    log = RatingLog(tmp_path / "review" / "ratings.jsonl")
    client = TestClient(
        create_app(review, log, loopback_hosts("127.0.0.1")), base_url="http://127.0.0.1:8765"
    )
    return review, log, client


def body(item: str, preference: str = "A", **change) -> dict:
    scores = {side: {"correctness": 4, "tone": 5, "safety": 5} for side in "AB"}
    return {"item": item, "scores": scores, "preference": preference, "comment": " ok ", **change}


def test_a_reviewer_resumes_at_the_first_unrated_item_and_sees_the_models_only_at_the_end(setup):
    review, log, client = setup
    assert client.get("/r/al/", follow_redirects=False).headers["location"] == "/r/al/item/1"
    for k, item in enumerate(review.items, 1):
        page = client.get(f"/r/al/item/{k}")
        assert page.status_code == 200 and f"Item {k} of 3" in page.text
        assert "tuned" not in page.text and "base" not in page.text  # blind: no label anywhere on the page
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert client.get("/r/al/done", follow_redirects=False).headers["location"] == f"/r/al/item/{k}"
        reply = client.post("/r/al/rate", json=body(item.id, preference="B"))
        nxt = "/r/al/done" if k == 3 else f"/r/al/item/{k + 1}"
        assert reply.json() == {"ok": True, "next": nxt}
        assert client.get("/r/al/", follow_redirects=False).headers["location"] == nxt

    lines = log.read()
    assert [(r["item"], r["preferred"], r["comment"]) for r in lines] == [
        (it.id, it.sides["B"], "ok") for it in review.items
    ]
    assert lines[0]["scores"] == {
        lab: {"correctness": 4, "tone": 5, "safety": 5} for lab in ("base", "tuned")
    }
    done = client.get("/r/al/done").text
    reveal = re.findall(r"<tr><td>(\d)</td><td>(\w+)</td><td>(\w+)</td>\s*<td>(\w+)</td></tr>", done)
    assert reveal == [
        (str(k), it.sides["A"], it.sides["B"], it.sides["B"]) for k, it in enumerate(review.items, 1)
    ]
    assert "al</a>: 3 / 3" in client.get("/").text
    assert (
        client.get("/r/bo/", follow_redirects=False).headers["location"] == "/r/bo/item/1"
    )  # a second reviewer


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"item": "9"}, "no item '9'"),
        ({"preference": "C"}, "preference must be one of A, B, tie, both_bad"),
        ({"scores": {"A": {"correctness": 4, "tone": 5, "safety": 5}}}, "no scores for answer B"),
        (
            {"scores": {"A": {"correctness": 6, "tone": 5, "safety": 5}, "B": {}}},
            "answer A correctness: give a whole number from 1 to 5",
        ),
        (
            {"scores": {"A": {"correctness": True, "tone": 5, "safety": 5}, "B": {}}},
            "answer A correctness: give a whole number from 1 to 5",
        ),
        ({"comment": "x" * 5001}, "comment: text of at most 5000 characters"),
    ],
)
def test_a_bad_rating_is_refused_and_nothing_is_written(setup, change, error):
    _, log, client = setup
    reply = client.post("/r/al/rate", json=body("0") | change)
    assert reply.status_code == 400 and reply.json() == {"ok": False, "error": error}
    assert not log.path.exists()


def test_bad_bodies_names_and_hosts(setup):
    _, log, client = setup
    assert client.post("/r/al/rate", content=b"not json").status_code == 400
    assert client.get("/r/bad name!/").status_code == 404
    assert client.get("/start?reviewer=ok_name", follow_redirects=False).headers["location"] == "/r/ok_name/"
    # a page elsewhere reaching the loopback server under its own host name (DNS rebinding) is turned away
    assert client.get("/", headers={"host": "attacker.example"}).status_code == 400
    assert client.get("/", headers={"host": "localhost:8765"}).status_code == 200
    assert not log.path.exists()
