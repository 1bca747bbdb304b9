"""`sftlab-review run=<run dir>` (base vs tuned) or `sftlab-review a=<run> b=<run>` (run b vs run a): a
blind side-by-side review page on loopback; add the word `summary` for the summary of the ratings so far.

The items are the run's evaluation generations (`eval/generations.jsonl`), so the prompts, template and
decoding are those of `sftlab-eval`. A model with no generations there (no eval ran, or `compare_base` was
off) is loaded through `sftlab.build.load_run` and answers the same prompts through the eval group's
`generate` settings (the one generation loop). The review set (items, blind sides, rubric) is saved on the
first start in the review directory (`<run>/review`, or `<a>/review_vs_<b name>` for two runs) as
`items.json`; ratings go to `ratings.jsonl` beside it. Later starts reuse both: nothing is generated again.

`summary` writes `summary.json` and `ratings.csv` into the review directory, adds the summary to
`<run>/eval/results.json` as `"human"` (base vs tuned reviews), prints it, and with `wandb=true` logs it to a
W&B run (offline unless you are logged in). See docs/review.md.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from sftlab.cli.args import parse
from sftlab.errors import ConfigError, SFTLabError
from sftlab.review.items import REVIEWER, ReviewSet, build_review_set, load_rubric
from sftlab.review.storage import RatingLog, write_json
from sftlab.review.summary import headline, summarize, write_csv

log = logging.getLogger("sftlab.review")
RUN_LABELS = ("base", "tuned")
AB_LABELS = ("run_a", "run_b")


@dataclass
class ReviewArgs:
    """run: a finished run, reviewed base vs tuned. a, b: two finished runs, reviewed b vs a on the same
    prompts. reviewer: your name (else the page asks). host/port: where to listen (port=0: any free port).
    seed: draws which model is shown left (recorded; default 0). rubric: a YAML file with `criteria:
    {name: question}` and `scale: [lo, hi]` (default: correctness, tone, safety on 1-5). max_items: review
    only the first N prompts. out: the review directory. Add the word `summary` to summarize the ratings
    instead (csv: where the CSV goes; wandb=true: also log to W&B)."""

    run: str | None = None
    a: str | None = None
    b: str | None = None
    reviewer: str | None = None
    host: str = "127.0.0.1"
    port: int = 8765
    seed: int | None = None
    rubric: str | None = None
    max_items: int | None = None
    out: str | None = None
    csv: str | None = None
    wandb: bool = False


def review_dir(args: ReviewArgs) -> Path:
    if args.out:
        return Path(args.out)
    if args.run:
        return Path(args.run) / "review"
    return Path(args.a) / f"review_vs_{Path(args.b).resolve().name}"


def check_args(args: ReviewArgs) -> None:
    if bool(args.run) == bool(args.a or args.b) or (not args.run and not (args.a and args.b)):
        raise ConfigError(
            "sftlab-review: give run=<run dir> (base vs tuned) or both a=<run dir> b=<run dir> (b vs a)."
        )
    for key in ("run", "a", "b"):
        value = getattr(args, key)
        if value and not Path(value).is_dir():
            raise ConfigError(f"sftlab-review: {key}={value!r} is not a directory.")
    if args.reviewer is not None and not REVIEWER.fullmatch(args.reviewer):
        raise ConfigError(f"reviewer={args.reviewer!r}: use 1-40 letters, digits, _ . or - (no spaces).")
    if args.max_items is not None and args.max_items < 1:
        raise ConfigError(f"max_items={args.max_items}: give a positive number of prompts.")


# ---- the items -------------------------------------------------------------------------------------------
def read_generations(run_dir: Path) -> dict[str, list[dict]]:
    """eval/generations.jsonl of a run, by model tag; empty when no evaluation wrote it."""
    path = Path(run_dir) / "eval" / "generations.jsonl"
    rows: dict[str, list[dict]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows.setdefault(row["model"], []).append(row)
    return rows


def generate_missing(run_dir: Path, tags: list[str], n_examples: int | None) -> dict[str, list[dict]]:
    """Generation rows for the `tags` ("base", "tuned") of a run, made as `sftlab-eval` makes them."""
    from peft import PeftModel

    from sftlab.build import load_run
    from sftlab.cli.eval import load_splits
    from sftlab.eval.generate import GenerationEval
    from sftlab.eval.suite import build_evaluators

    run = load_run(run_dir, with_adapter=True)
    chosen = [e for e in build_evaluators(run.cfg.get("eval")).values() if isinstance(e, GenerationEval)]
    gen = chosen[0] if chosen else GenerationEval()
    if n_examples is not None:
        gen = replace(gen, max_examples=n_examples)
    splits = load_splits(run, None)
    if gen.split not in splits:
        raise ConfigError(
            f"{run_dir}: the run has no {gen.split!r} split to answer (data.{gen.split}_path) and no "
            "eval/generations.jsonl; run sftlab-eval with test_path=<file> first."
        )
    rows = splits[gen.split].rows
    out = {}
    for tag in tags:
        log.warning("Generating the %s model's answers of %s (not in eval/generations.jsonl)", tag, run_dir)
        if tag == "tuned":
            out[tag] = gen.generate_records(run.model, run.tokenizer, run.template, rows)
        elif isinstance(run.model, PeftModel):
            with run.model.disable_adapter():
                out[tag] = gen.generate_records(run.model, run.tokenizer, run.template, rows)
        else:
            base = load_run(run_dir, with_adapter=False)
            out[tag] = gen.generate_records(base.model, base.tokenizer, base.template, rows)
    return out


def _count(rows: list[dict]) -> int:
    return max(r["index"] for r in rows) + 1


def make_review_set(args: ReviewArgs) -> ReviewSet:
    rubric = load_rubric(args.rubric)
    seed = 0 if args.seed is None else args.seed
    if args.run:
        run = Path(args.run)
        rows = read_generations(run)
        have = {t: rows[t] for t in RUN_LABELS if rows.get(t)}
        missing = [t for t in RUN_LABELS if t not in have]
        if missing:
            n = args.max_items if not have else _count(next(iter(have.values())))
            have.update(generate_missing(run, missing, n))
        sources = {"base": f"{run.resolve()} (adapter disabled)", "tuned": str(run.resolve())}
        return build_review_set(
            have["base"],
            have["tuned"],
            labels=RUN_LABELS,
            sources=sources,
            seed=seed,
            rubric=rubric,
            max_items=args.max_items,
        )
    runs = [Path(args.a), Path(args.b)]
    tuned = [read_generations(r).get("tuned") for r in runs]
    for i, r in enumerate(runs):
        if not tuned[i]:
            other = tuned[1 - i]
            tuned[i] = generate_missing(r, ["tuned"], _count(other) if other else args.max_items)["tuned"]
    return build_review_set(
        tuned[0],
        tuned[1],
        labels=AB_LABELS,
        sources={label: str(r.resolve()) for label, r in zip(AB_LABELS, runs, strict=True)},
        seed=seed,
        rubric=rubric,
        max_items=args.max_items,
    )


def open_review_set(args: ReviewArgs, folder: Path, *, create: bool) -> ReviewSet:
    """The saved review set of `folder`, checked against what the command line asks; made when absent."""
    path = folder / "items.json"
    if path.is_file():
        review = ReviewSet.load(path)
        if args.seed is not None and args.seed != review.seed:
            raise ConfigError(
                f"seed={args.seed}: {path} was drawn with seed={review.seed}; its ratings refer to those "
                "sides. Leave seed out, or start a separate review with out=<another dir>."
            )
        if args.rubric is not None and load_rubric(args.rubric) != review.rubric:
            raise ConfigError(
                f"rubric={args.rubric}: {path} was made with another rubric "
                f"({', '.join(review.rubric.criteria)}). Leave rubric out, or use out=<another dir>."
            )
        return review
    if not create:
        raise SFTLabError(f"{folder}: no review here yet (no items.json). Start one without `summary`.")
    review = make_review_set(args)
    review.save(path)
    return review


# ---- the two actions ---------------------------------------------------------------------------------------
def start_server(args: ReviewArgs, review: ReviewSet, folder: Path) -> None:
    from sftlab.review import server  # the web stack (the `review` extra) only where a page is served

    ratings = RatingLog(folder / "ratings.jsonl")
    app = server.create_app(review, ratings, server.loopback_hosts(args.host))
    try:
        sock = server.bind(args.host, args.port)
    except OSError as err:
        raise SFTLabError(f"port={args.port}: cannot listen on {args.host} ({err}); try port=0.") from None
    url = server.url_of(sock, args.host) + (f"/r/{args.reviewer}/" if args.reviewer else "/")
    done = len(ratings.latest())
    print(
        f"sftlab-review: {len(review.items)} items, {done} ratings so far; saving to {ratings.path}",
        file=sys.stderr,
    )
    print(f"sftlab-review: open {url}  (Ctrl-C stops)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve(app, sock)


def write_summary(args: ReviewArgs, review: ReviewSet, folder: Path) -> dict:
    ratings = RatingLog(folder / "ratings.jsonl").read()
    summary = summarize(review, ratings)
    write_json(folder / "summary.json", summary)
    csv_path = write_csv(review, ratings, Path(args.csv) if args.csv else folder / "ratings.csv")
    if args.run:  # the run's own results gain the human verdict beside the metrics and the judge
        results_path = Path(args.run) / "eval" / "results.json"
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        write_json(results_path, {**results, "human": summary})
    print("\n".join(headline(summary)))
    print(f"Wrote {folder / 'summary.json'} and {csv_path}")
    if args.wandb:
        log_wandb(summary, csv_path, folder)
    return summary


def log_wandb(summary: dict, csv_path: Path, folder: Path) -> None:
    import wandb

    from sftlab.training import loggers

    if not os.environ.get("WANDB_MODE") and not loggers.wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    name = f"review-{folder.parent.name}"
    with wandb.init(project="sftlab", job_type="review", dir=str(folder), name=name) as wb:
        wb.summary.update({"human": summary})
        wb.log({"review/ratings": wandb.Table(columns=rows[0], data=rows[1:])})


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="[%(name)s][%(levelname)s] - %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    action = "summary" if "summary" in argv else "serve"
    argv = [a for a in argv if a != "summary"]
    try:
        args = parse(ReviewArgs, argv, prog="sftlab-review")
        check_args(args)
        folder = review_dir(args)
        review = open_review_set(args, folder, create=action == "serve")
        if action == "summary":
            write_summary(args, review, folder)
        else:
            start_server(args, review, folder)
    except SFTLabError as err:
        log.error("%s", err)
        raise SystemExit(1) from None
    except ImportError as err:
        log.error("sftlab-review needs %s: pip install 'sftlab[review]'", err.name)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
