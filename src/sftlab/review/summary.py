"""What the ratings say: win / tie / both-bad / loss rates of the candidate (tuned, or run b) against the
reference model (base, or run a) with 95% Wilson score intervals, per-criterion means and spread, ratings per
reviewer, inter-reviewer agreement, and agreement with the LLM judge where it scored the same items.

Counting: the latest rating of each (reviewer, item) is one observation. With several reviewers on the same
items the observations are not independent, so the intervals are then somewhat too narrow; they are exact
in meaning for one reviewer.

Agreement is Cohen's kappa (scikit-learn) on the outcome of each item (win, loss, tie, both_bad), for each
pair of reviewers over the items both rated. The judge's preference on an item is the model with the higher
mean rubric score (equal means: tie); against it a human "both bad" counts as a tie.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from sftlab.review.items import ReviewSet
from sftlab.review.storage import latest

OUTCOMES = ("win", "tie", "both_bad", "loss")
JUDGE_OUTCOMES = ("win", "tie", "loss")
TOP_DISAGREEMENTS = 5


def outcome(rating: dict, labels: Sequence[str]) -> str:
    """The rating from the candidate's (labels[1]) point of view."""
    preferred = rating["preferred"]
    if preferred == labels[1]:
        return "win"
    if preferred == labels[0]:
        return "loss"
    return preferred  # tie | both_bad


def wilson(successes: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Wilson score interval of a binomial proportion (good near 0 and 1 and for small n, unlike Wald)."""
    if n == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


def kappa(first: Sequence[str], second: Sequence[str], labels: Sequence[str]) -> float | None:
    """Cohen's kappa; None where it is undefined (both raters gave one and the same label throughout)."""
    from sklearn.metrics import cohen_kappa_score

    if not first or (len(set(first) | set(second)) == 1):
        return None
    value = float(cohen_kappa_score(first, second, labels=list(labels)))
    return None if math.isnan(value) else value


def _spread(values: list[float]) -> dict[str, float | int]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "n": len(values)}


def judge_outcome(item_judge: dict[str, Any], labels: Sequence[str]) -> tuple[str, float] | None:
    """The judge's verdict on an item as (outcome, candidate mean score - reference mean score)."""
    verdicts = [item_judge.get(label) for label in labels]
    if any(v is None or v.get("error") or not v.get("scores") for v in verdicts):
        return None
    ref, cand = (statistics.fmean(v["scores"].values()) for v in verdicts)
    diff = cand - ref
    return ("win" if diff > 0 else "loss" if diff < 0 else "tie"), diff


def summarize(review: ReviewSet, ratings: list[dict]) -> dict[str, Any]:
    """The summary as plain data (what summary.json, eval/results.json["human"] and W&B receive)."""
    labels = review.labels
    items = review.by_id()
    rows = [r for r in latest(ratings) if r["item"] in items]
    outcomes = [outcome(r, labels) for r in rows]
    counts = Counter(outcomes)
    n = len(rows)
    out: dict[str, Any] = {
        "reference": labels[0],
        "candidate": labels[1],
        "n_items": len(items),
        "n_ratings": n,
        "items_rated": len({r["item"] for r in rows}),
        "reviewers": dict(sorted(Counter(r["reviewer"] for r in rows).items())),
        "ci_method": "wilson",
        "preference": {
            o: {"count": counts[o], "rate": counts[o] / n if n else None, "ci95": wilson(counts[o], n)}
            for o in OUTCOMES
        },
        "criteria": {},
        "inter_reviewer": _inter_reviewer(rows, labels),
        "judge": _versus_judge(rows, review),
    }
    for label in labels:
        out["criteria"][label] = {
            c: _spread([float(r["scores"][label][c]) for r in rows if c in r["scores"].get(label, {})])
            for c in review.rubric.criteria
            if any(c in r["scores"].get(label, {}) for r in rows)
        }
    return out


def _inter_reviewer(rows: list[dict], labels: Sequence[str]) -> dict[str, Any] | None:
    by_reviewer: dict[str, dict[str, str]] = defaultdict(dict)
    for r in rows:
        by_reviewer[r["reviewer"]][r["item"]] = outcome(r, labels)
    pairs = []
    for a, b in combinations(sorted(by_reviewer), 2):
        common = sorted(set(by_reviewer[a]) & set(by_reviewer[b]))
        if not common:
            continue
        first, second = [by_reviewer[a][i] for i in common], [by_reviewer[b][i] for i in common]
        pairs.append(
            {
                "reviewers": [a, b],
                "n": len(common),
                "agreement": sum(x == y for x, y in zip(first, second, strict=True)) / len(common),
                "kappa": kappa(first, second, OUTCOMES),
            }
        )
    if not pairs:
        return None
    kappas = [p["kappa"] for p in pairs if p["kappa"] is not None]
    return {"pairs": pairs, "mean_kappa": statistics.fmean(kappas) if kappas else None}


def _versus_judge(rows: list[dict], review: ReviewSet) -> dict[str, Any] | None:
    labels, items = review.labels, review.by_id()
    judged = {i: v for i, it in items.items() if (v := judge_outcome(it.judge, labels)) is not None}
    scored = [r for r in rows if r["item"] in judged]
    if not scored:
        return None
    human = [_as_judge_outcome(outcome(r, labels)) for r in scored]
    machine = [judged[r["item"]][0] for r in scored]
    per_item: dict[str, list[int]] = defaultdict(list)
    for r, h in zip(scored, human, strict=True):
        per_item[r["item"]].append({"win": 1, "loss": -1}.get(h, 0))
    gaps = []
    for item_id, margins in per_item.items():
        verdict, diff = judged[item_id]
        human_margin = statistics.fmean(margins)
        judge_margin = {"win": 1, "loss": -1}.get(verdict, 0)
        gap = abs(human_margin - judge_margin)
        if gap > 0:
            item = items[item_id]
            comments = [r["comment"] for r in scored if r["item"] == item_id and r.get("comment")]
            gaps.append(
                {
                    "item": item_id,
                    "index": item.index,
                    "prompt": item.prompt,
                    "human_margin": human_margin,
                    "judge_margin": judge_margin,
                    "judge_score_diff": diff,
                    "gap": gap,
                    "comments": comments,
                }
            )
    gaps.sort(key=lambda g: (-g["gap"], -abs(g["judge_score_diff"]), g["index"]))
    return {
        "n_ratings": len(scored),
        "n_items": len(per_item),
        "agreement": sum(h == m for h, m in zip(human, machine, strict=True)) / len(scored),
        "kappa": kappa(human, machine, JUDGE_OUTCOMES),
        "criteria": _criteria_versus_judge(scored, review),
        "disagreements": gaps[:TOP_DISAGREEMENTS],
    }


def _as_judge_outcome(o: str) -> str:
    return "tie" if o == "both_bad" else o


def _criteria_versus_judge(rows: list[dict], review: ReviewSet) -> dict[str, Any]:
    """Mean human and judge score per shared criterion and model, over the rated items the judge scored."""
    items, out = review.by_id(), {}
    for c in review.rubric.criteria:
        per_label = {}
        for label in review.labels:
            pairs = [
                (float(r["scores"][label][c]), float(items[r["item"]].judge[label]["scores"][c]))
                for r in rows
                if c in r["scores"].get(label, {}) and c in items[r["item"]].judge[label]["scores"]
            ]
            if pairs:
                human, judge = zip(*pairs, strict=True)
                per_label[label] = {"human": statistics.fmean(human), "judge": statistics.fmean(judge)}
        if per_label:
            out[c] = per_label
    return out


def headline(summary: dict[str, Any]) -> list[str]:
    """The summary in a few lines of text (the command's output and sftlab-report's run report)."""
    cand, ref, n = summary["candidate"], summary["reference"], summary["n_ratings"]
    if not n:
        return [f"human review: no ratings yet ({summary['n_items']} items)"]
    reviewers = ", ".join(f"{k} {v}" for k, v in summary["reviewers"].items())
    lines = [
        f"human review: {n} ratings of {summary['items_rated']}/{summary['n_items']} items ({reviewers})",
        f"{cand} vs {ref} (95% Wilson interval):",
    ]
    for o in OUTCOMES:
        p = summary["preference"][o]
        lo, hi = p["ci95"]
        lines.append(f"  {o:<8} {p['rate']:6.1%}  [{lo:.1%}, {hi:.1%}]  ({p['count']})")
    for label, crits in summary["criteria"].items():
        text = ", ".join(f"{c} {s['mean']:.2f} ± {s['std']:.2f}" for c, s in crits.items())
        lines.append(f"{label}: {text}")
    inter = summary.get("inter_reviewer")
    if inter:
        for p in inter["pairs"]:
            k = "undefined" if p["kappa"] is None else f"{p['kappa']:.3f}"
            a, b = p["reviewers"]
            lines.append(f"reviewers {a} & {b}: kappa {k}, agreement {p['agreement']:.1%} on {p['n']} items")
    judge = summary.get("judge")
    if judge:
        k = "undefined" if judge["kappa"] is None else f"{judge['kappa']:.3f}"
        lines.append(
            f"humans vs LLM judge: agreement {judge['agreement']:.1%}, kappa {k} "
            f"({judge['n_ratings']} ratings of {judge['n_items']} items)"
        )
        for d in judge["disagreements"]:
            prompt = " ".join(d["prompt"].split())[:70]
            lines.append(
                f"  second look: item {d['item']} (human {d['human_margin']:+.2f}, "
                f"judge {d['judge_margin']:+d}): {prompt}"
            )
    return lines


def write_csv(review: ReviewSet, ratings: list[dict], path: Path) -> Path:
    """The ratings the summary counts (latest per reviewer and item), one row each."""
    labels, items = review.labels, review.by_id()
    score_cols = [f"{label}_{c}" for label in labels for c in review.rubric.criteria]
    columns = ["reviewer", "item", "index", "A", "B", "preference", "preferred", "outcome", *score_cols]
    columns += ["comment", "time", "prompt"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in latest(ratings):
            if r["item"] not in items:
                continue
            row = {
                "reviewer": r["reviewer"],
                "item": r["item"],
                "index": items[r["item"]].index,
                "A": r["sides"]["A"],
                "B": r["sides"]["B"],
                "preference": r["preference"],
                "preferred": r["preferred"],
                "outcome": outcome(r, labels),
                "comment": r.get("comment", ""),
                "time": r.get("time", ""),
                "prompt": items[r["item"]].prompt,
            }
            for label in labels:
                for c in review.rubric.criteria:
                    row[f"{label}_{c}"] = r["scores"].get(label, {}).get(c, "")
            writer.writerow(row)
    return path
