"""ratings.jsonl: appended, durable, and never corrupted by a line a kill tore in half."""

from __future__ import annotations

from sftlab.review.storage import RatingLog


def test_a_torn_last_line_is_skipped_and_sealed_before_the_next_rating(tmp_path):
    log = RatingLog(tmp_path / "review" / "ratings.jsonl")
    log.append({"reviewer": "al", "item": "0", "preferred": "tuned"})
    with open(log.path, "ab") as f:  # what a kill in the middle of a write leaves
        f.write(b'{"reviewer": "al", "item": "1", "pre')
    log.append({"reviewer": "al", "item": "1", "preferred": "base"})
    assert log.read() == [
        {"reviewer": "al", "item": "0", "preferred": "tuned"},
        {"reviewer": "al", "item": "1", "preferred": "base"},
    ]
    assert (
        log.path.read_text().count("\n") == 3 and log.rated("al") == {"0", "1"} and log.rated("bo") == set()
    )


def test_rating_again_appends_and_the_latest_line_counts(tmp_path):
    log = RatingLog(tmp_path / "ratings.jsonl")
    for reviewer, item, preferred in [("al", "0", "tuned"), ("bo", "0", "tie"), ("al", "0", "base")]:
        log.append({"reviewer": reviewer, "item": item, "preferred": preferred})
    assert len(log.read()) == 3
    assert log.latest() == [
        {"reviewer": "al", "item": "0", "preferred": "base"},
        {"reviewer": "bo", "item": "0", "preferred": "tie"},
    ]
