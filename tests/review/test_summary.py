"""The summary's figures against values worked out by hand: rates and Wilson intervals, per-criterion means,
Cohen's kappa between reviewers and against the LLM judge, the items to look at again, and the CSV."""

from __future__ import annotations

import csv
import math
import statistics

import pytest

from sftlab.review.items import ReviewSet, Rubric, build_review_set
from sftlab.review.server import validate
from sftlab.review.summary import headline, summarize, write_csv
from tests.review.conftest import write_run
from tests.review.test_items import rows

Z = 1.959963984540054  # the 97.5% normal quantile


def wilson_by_hand(k: int, n: int) -> list[float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return [centre - half, centre + half]


def rating(review: ReviewSet, reviewer: str, item: str, outcome: str, tuned: int, base: int = 3) -> dict:
    """The stored line for `outcome` from the tuned model's side, made by the server's own validation."""
    side_of = {label: side for side, label in review.by_id()[item].sides.items()}
    preference = {"win": side_of["tuned"], "loss": side_of["base"]}.get(outcome, outcome)
    scores = {side_of["tuned"]: dict.fromkeys(review.rubric.criteria, tuned)}
    scores[side_of["base"]] = dict.fromkeys(review.rubric.criteria, base)
    return validate(review, reviewer, {"item": item, "scores": scores, "preference": preference})


@pytest.fixture
def review(tmp_path):
    # judge means per item: base 3, 2, 3, (parse failure); tuned 4, 2, 1, 5 -> win, tie, loss, unjudged
    r = rows(write_run(tmp_path, 4, judge={"base": [3, 2, 3, None], "tuned": [4, 2, 1, 5]}))
    return build_review_set(
        r["base"], r["tuned"], labels=("base", "tuned"), sources={}, seed=0, rubric=Rubric()
    )


@pytest.fixture
def ratings(review):
    return [
        rating(review, "alice", "0", "win", 5),
        rating(review, "alice", "1", "win", 4),
        rating(review, "alice", "2", "tie", 3),
        rating(review, "alice", "3", "win", 5),  # rated again below: only the later line counts
        rating(review, "bob", "0", "win", 4),
        rating(review, "bob", "1", "loss", 2),
        rating(review, "bob", "2", "tie", 3),
        rating(review, "bob", "3", "loss", 1),
        rating(review, "alice", "3", "loss", 2),
        {**rating(review, "carol", "0", "both_bad", 1, base=1), "comment": "neither gives a date"},
    ]


def test_preference_rates_carry_wilson_intervals(review, ratings):
    s = summarize(review, ratings)
    assert (s["n_ratings"], s["n_items"], s["items_rated"]) == (9, 4, 4)
    assert s["reviewers"] == {"alice": 4, "bob": 4, "carol": 1}
    counts = {"win": 3, "tie": 2, "both_bad": 1, "loss": 3}
    for outcome, k in counts.items():
        p = s["preference"][outcome]
        assert p["count"] == k and p["rate"] == k / 9
        assert p["ci95"] == pytest.approx(wilson_by_hand(k, 9), abs=1e-12)

    tuned = [5, 4, 3, 4, 2, 3, 1, 2, 1]  # the tuned scores of the nine latest ratings, every criterion alike
    for c in ("correctness", "tone", "safety"):
        assert s["criteria"]["tuned"][c] == pytest.approx(
            {"mean": statistics.fmean(tuned), "std": statistics.pstdev(tuned), "n": 9}
        )
        assert s["criteria"]["base"][c] == {
            "mean": pytest.approx(25 / 9),
            "std": pytest.approx(0.62853936),
            "n": 9,
        }


def test_kappa_between_reviewers(review, ratings):
    inter = summarize(review, ratings)["inter_reviewer"]
    # alice win win tie loss / bob win loss tie loss: p_o = 3/4, p_e = (2*1 + 1*1 + 1*2)/16 -> kappa 7/11
    assert inter["pairs"][0] == {
        "reviewers": ["alice", "bob"],
        "n": 4,
        "agreement": 0.75,
        "kappa": pytest.approx(7 / 11),
    }
    # carol shares item 0 only, and disagrees: p_o = 0 = p_e -> kappa 0
    assert inter["pairs"][1] == {"reviewers": ["alice", "carol"], "n": 1, "agreement": 0.0, "kappa": 0.0}
    assert inter["pairs"][2]["reviewers"] == ["bob", "carol"] and inter["pairs"][2]["kappa"] == 0.0
    assert inter["mean_kappa"] == pytest.approx(7 / 33)


def test_humans_against_the_judge(review, ratings):
    judge = summarize(review, ratings)["judge"]
    # judged items 0, 1, 2 (item 3's base verdict failed to parse); "both bad" counts as a tie here
    human = ["win", "win", "tie", "win", "loss", "tie", "tie"]  # alice 0 1 2, bob 0 1 2, carol 0
    machine = ["win", "tie", "loss", "win", "tie", "loss", "win"]
    assert (judge["n_ratings"], judge["n_items"]) == (7, 3)
    assert judge["agreement"] == pytest.approx(2 / 7)
    p_o = 2 / 7
    p_e = sum(human.count(x) * machine.count(x) for x in ("win", "tie", "loss")) / 49
    assert judge["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))
    # human margins: item 0 (1 + 1 + 0)/3, item 1 (1 - 1)/2, item 2 0; judge +1, 0, -1
    gaps = [(d["item"], d["human_margin"], d["judge_margin"], d["gap"]) for d in judge["disagreements"]]
    assert gaps == [("2", 0.0, -1, 1.0), ("0", pytest.approx(2 / 3), 1, pytest.approx(1 / 3))]
    assert judge["disagreements"][1]["comments"] == ["neither gives a date"]
    assert judge["criteria"]["correctness"]["tuned"] == {
        "human": pytest.approx(22 / 7),
        "judge": pytest.approx(18 / 7),
    }
    assert "second look: item 2 (human +0.00, judge -1)" in "\n".join(headline(summarize(review, ratings)))


def test_no_ratings_and_no_judge(review):
    s = summarize(review, [])
    assert s["n_ratings"] == 0 and s["preference"]["win"] == {"count": 0, "rate": None, "ci95": None}
    assert s["inter_reviewer"] is None and s["judge"] is None
    assert headline(s) == ["human review: no ratings yet (4 items)"]


def test_csv_has_one_row_per_counted_rating(review, ratings, tmp_path):
    path = write_csv(review, ratings, tmp_path / "ratings.csv")
    with open(path, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9
    alice3 = next(r for r in table if r["reviewer"] == "alice" and r["item"] == "3")
    assert (alice3["outcome"], alice3["preferred"], alice3["tuned_correctness"], alice3["base_safety"]) == (
        "loss",
        "base",
        "2",
        "3",
    )
    assert alice3["A"] == review.items[3].sides["A"] and alice3["prompt"] == review.items[3].prompt
    assert list(table[0])[:9] == [
        "reviewer",
        "item",
        "index",
        "A",
        "B",
        "preference",
        "preferred",
        "outcome",
        "base_correctness",
    ]
