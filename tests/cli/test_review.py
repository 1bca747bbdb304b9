"""`sftlab-review`: the command end to end without a browser — a killed server loses no acknowledged rating,
the summary lands in summary.json, ratings.csv and eval/results.json, and missing generations are made by
the one generation loop on the run's own model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sftlab.cli import report
from sftlab.cli.review import AB_LABELS, ReviewArgs, main, open_review_set, review_dir
from sftlab.review.items import ReviewSet
from sftlab.review.server import validate
from sftlab.review.storage import RatingLog
from tests.conftest import ROOT, make_adapter_run
from tests.review.conftest import PROMPTS, write_run


def start(run_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """The real command on a free port; returns the process and the URL it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sftlab.cli.review", f"run={run_dir}", "port=0", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    found = re.search(r"open (http://\S+)", line)
    if not found:
        proc.kill()
        raise AssertionError(f"no URL printed: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, found.group(1)


def rate(url: str, item: str, preference: str) -> dict:
    scores = {side: {"correctness": 3, "tone": 4, "safety": 5} for side in "AB"}
    body = {"item": item, "scores": scores, "preference": preference}
    return httpx.post(url.rstrip("/") + "/rate", json=body, timeout=10).json()


def test_a_killed_server_loses_no_acknowledged_rating_and_the_next_start_resumes(tmp_path):
    run = write_run(tmp_path / "run", 4)
    proc, url = start(run, "reviewer=al")
    try:
        assert url.endswith("/r/al/")
        assert rate(url, "0", "A") == {"ok": True, "next": "/r/al/item/2"}
        assert rate(url, "1", "tie") == {"ok": True, "next": "/r/al/item/3"}
    finally:
        proc.kill()  # SIGKILL: no shutdown handler runs, nothing is flushed on the way out
        proc.wait(timeout=10)
    lines = [json.loads(x) for x in (run / "review" / "ratings.jsonl").read_text().splitlines()]
    assert [(r["reviewer"], r["item"], r["preference"]) for r in lines] == [
        ("al", "0", "A"),
        ("al", "1", "tie"),
    ]

    proc, url = start(run, "reviewer=al")
    try:
        resumed = httpx.get(url, timeout=10, follow_redirects=False)
        assert resumed.status_code == 303 and resumed.headers["location"] == "/r/al/item/3"
        assert rate(url, "2", "B") == {"ok": True, "next": "/r/al/item/4"}
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert len((run / "review" / "ratings.jsonl").read_text().splitlines()) == 3


def rated_run(tmp_path: Path) -> tuple[Path, ReviewSet]:
    """A run with a review of three items, all rated by `al`: A, B, both bad."""
    run = write_run(tmp_path / "run", 3)
    args = ReviewArgs(run=str(run), seed=3)
    review = open_review_set(args, review_dir(args), create=True)
    log = RatingLog(run / "review" / "ratings.jsonl")
    scores = {s: {"correctness": 5, "tone": 5, "safety": 5} for s in "AB"}
    for item, pref in (("0", "A"), ("1", "B"), ("2", "both_bad")):
        log.append(validate(review, "al", {"item": item, "scores": scores, "preference": pref}))
    return run, review


def test_summary_writes_json_csv_and_the_runs_results(tmp_path, capsys):
    run, review = rated_run(tmp_path)
    (run / "eval" / "results.json").write_text(json.dumps({"tuned": {"exact_match": 1.0}}))

    main([f"run={run}", "summary"])
    summary = json.loads((run / "review" / "summary.json").read_text())
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results == {"tuned": {"exact_match": 1.0}, "human": summary}
    wins = sum(review.items[i].sides[p] == "tuned" for i, p in ((0, "A"), (1, "B")))
    assert summary["preference"]["win"]["count"] == wins and summary["preference"]["both_bad"]["count"] == 1
    csv_lines = (run / "review" / "ratings.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith(
        "reviewer,item,index,A,B,preference,preferred,outcome"
    )
    out = capsys.readouterr().out
    assert "human review: 3 ratings of 3/3 items (al 3)" in out and "both_bad  33.3%" in out

    (run / "config.yaml").write_text("seed: 42\n")  # sftlab-report's run report carries the headline too
    report.main([str(run)])
    md = (run / "report.md").read_text()
    assert "```text\nhuman review: 3 ratings of 3/3 items (al 3)\n" in md and "  both_bad  33.3%" in md


def test_summary_goes_to_an_offline_wandb_run(tmp_path):
    import wandb

    from tests.helpers.wandb_log import offline_runs

    run, _ = rated_run(tmp_path)
    main([f"run={run}", "summary", "wandb=true"])
    wandb.teardown()  # the service process flushes the run file
    [logged] = offline_runs(run / "review")
    assert logged.name == "review-run" and logged.summary["human"]["n_ratings"] == 3
    assert logged.summary["human"]["preference"]["both_bad"]["count"] == 1


def test_command_line_mistakes_are_one_clear_message(tmp_path, caplog):
    run = write_run(tmp_path / "run", 2)
    cases = [
        ([], "give run=<run dir> (base vs tuned) or both a=<run dir> b=<run dir>"),
        ([f"a={run}"], "give run=<run dir> (base vs tuned) or both a=<run dir> b=<run dir>"),
        ([f"run={run}", "summary"], "no review here yet (no items.json)"),
        ([f"run={run}", "reviewer=a b"], "reviewer='a b': use 1-40 letters"),
        ([f"run={tmp_path / 'nope'}"], "is not a directory"),
    ]
    for argv, message in cases:
        caplog.clear()
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 1 and message in caplog.text, (argv, caplog.text)
    open_review_set(ReviewArgs(run=str(run)), run / "review", create=True)
    with pytest.raises(SystemExit):
        main([f"run={run}", "seed=5", "summary"])
    assert "seed=5: " in caplog.text and "was drawn with seed=0" in caplog.text


def test_two_runs_are_reviewed_on_the_same_prompts(tmp_path):
    a, b = write_run(tmp_path / "a", 3), write_run(tmp_path / "b", 3)
    args = ReviewArgs(a=str(a), b=str(b), max_items=2)
    folder = review_dir(args)
    assert folder == a / "review_vs_b"
    review = open_review_set(args, folder, create=True)
    assert review.labels == AB_LABELS and len(review.items) == 2
    assert review.sources == {"run_a": str(a.resolve()), "run_b": str(b.resolve())}
    assert ReviewSet.load(folder / "items.json") == review

    other = write_run(tmp_path / "c", 3, prompts=PROMPTS[1:])
    with pytest.raises(SystemExit):
        main([f"a={a}", f"b={other}", "out=" + str(tmp_path / "x")])


def test_missing_generations_are_made_by_the_runs_own_model(tmp_path):
    from sftlab.build import load_run
    from sftlab.data.formats import split_prompt
    from sftlab.model.generate import generate

    run_dir, *_ = make_adapter_run(tmp_path / "run", ["eval.generate.max_new_tokens=5"])
    review = open_review_set(ReviewArgs(run=str(run_dir), max_items=2), run_dir / "review", create=True)

    run = load_run(run_dir)
    tests = [
        json.loads(x) for x in (ROOT / "src/sftlab/resources/iso_dates/test.jsonl").read_text().splitlines()
    ]
    histories = [split_prompt(t["messages"])[0] for t in tests[:2]]
    tuned = generate(run.model, run.tokenizer, run.template, histories, max_new_tokens=5)
    with run.model.disable_adapter():
        base = generate(run.model, run.tokenizer, run.template, histories, max_new_tokens=5)
    assert [it.prompt for it in review.items] == [h[-1]["content"] for h in histories]
    assert [it.outputs["tuned"] for it in review.items] == [o["text"] for o in tuned]
    assert [it.outputs["base"] for it in review.items] == [o["text"] for o in base]
    assert [o["text"] for o in tuned] != [o["text"] for o in base]
    assert not (run_dir / "eval" / "generations.jsonl").exists()  # the run's own eval files are left alone
