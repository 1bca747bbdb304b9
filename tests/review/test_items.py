"""The review set: pairs by example, seeded and recorded blind sides, the rubric file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftlab.errors import ConfigError
from sftlab.review.items import DEFAULT_CRITERIA, ReviewSet, Rubric, build_review_set, load_rubric
from tests.conftest import ROOT
from tests.review.conftest import PROMPTS, write_run


def rows(run_dir: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for line in (run_dir / "eval" / "generations.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["model"], []).append(row)
    return out


def make(run_dir: Path, seed: int = 0, n: int = 6, **kw) -> ReviewSet:
    r = rows(write_run(run_dir, n, **kw))
    return build_review_set(
        r["base"], r["tuned"], labels=("base", "tuned"), sources={}, seed=seed, rubric=Rubric()
    )


def test_sides_are_drawn_per_item_from_the_seed_and_survive_a_save(tmp_path):
    review = make(tmp_path)
    sides = [it.sides["A"] for it in review.items]
    # random.Random(0).random() for six items: .844 .758 .421 .259 .511 .404 -> flipped where < .5
    assert sides == ["base", "base", "tuned", "tuned", "base", "tuned"]
    assert [it.sides["B"] for it in review.items] == ["tuned", "tuned", "base", "base", "tuned", "base"]
    assert [it.id for it in review.items] == ["0", "1", "2", "3", "4", "5"]
    assert (
        review.items[2].output("A") == "2020-01-12"
        and review.items[2].output("B") == "The date is 21-10-0202."
    )
    assert [it.sides["A"] for it in make(tmp_path, seed=1).items] != sides

    review.save(tmp_path / "items.json")
    again = ReviewSet.load(tmp_path / "items.json")
    assert again == review
    assert list(again.rubric.criteria) == ["correctness", "tone", "safety"]  # author's order, not sorted


def test_judge_verdicts_travel_with_their_items(tmp_path):
    review = make(tmp_path, n=2, judge={"tuned": [5, None]})
    assert review.items[0].judge["tuned"]["scores"]["correctness"] == 5
    assert "base" not in review.items[0].judge
    assert review.items[1].judge["tuned"]["error"] == "no valid 1-5 score"


def test_answers_to_different_prompts_are_refused(tmp_path):
    a, b = rows(write_run(tmp_path / "a", 3)), rows(write_run(tmp_path / "b", 3, prompts=PROMPTS[::-1]))
    with pytest.raises(ConfigError, match="example 0: run_a and run_b answered different prompts"):
        build_review_set(
            a["tuned"], b["tuned"], labels=("run_a", "run_b"), sources={}, seed=0, rubric=Rubric()
        )


def test_the_judge_config_file_is_a_rubric_and_bad_rubrics_are_refused(tmp_path):
    judge = load_rubric(ROOT / "conf/eval/judge.yaml")
    assert list(judge.criteria) == ["correctness", "helpfulness", "tone", "safety"] and judge.scale == (1, 5)
    (tmp_path / "r.yaml").write_text(
        "criteria:\n  accuracy: Is it right?\n  brevity: Is it short?\nscale: [0, 3]\n"
    )
    assert load_rubric(tmp_path / "r.yaml") == Rubric(
        {"accuracy": "Is it right?", "brevity": "Is it short?"}, (0, 3)
    )
    assert load_rubric(None).criteria == DEFAULT_CRITERIA
    with pytest.raises(ConfigError, match=r"scale=\[1, 10\]: give \[lowest, highest\] within 0-9"):
        Rubric(scale=(1, 10))
    (tmp_path / "bad.yaml").write_text("criteria: {a: b}\nscales: [1, 5]\n")
    with pytest.raises(ConfigError, match="unknown key 'scales'"):
        load_rubric(tmp_path / "bad.yaml")
