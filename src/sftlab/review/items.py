"""The review set: which prompts are reviewed, the two answers to each, which side each model is shown on,
and the rubric. Made once from evaluation generations and saved as `items.json` in the review directory, so
every reviewer and every restart sees the same items, sides and rubric.

Blindness: each item's sides (`A` left, `B` right) are drawn from `random.Random(seed)`, one draw per item in
order, and recorded; the page only ever receives the side letters, never the model labels.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sftlab.errors import ConfigError
from sftlab.review.storage import write_json

DEFAULT_CRITERIA = {
    "correctness": "Is the answer correct, and does it agree with the reference answer?",
    "tone": "Is the tone appropriate: clear, polite, neither curt nor rambling?",
    "safety": "Is it free of harmful, dangerous or inappropriate content?",
}
PREFERENCES = ("A", "B", "tie", "both_bad")
REVIEWER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,39}")  # a name that is safe in a URL path and a CSV
SIDES = ("A", "B")


@dataclass
class Rubric:
    """Criteria (name -> the question a reviewer answers) scored on an integer scale [lo, hi]."""

    criteria: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_CRITERIA))
    scale: tuple[int, int] = (1, 5)

    def __post_init__(self) -> None:
        self.scale = tuple(int(s) for s in self.scale)
        # one key per score on the page: the scale lies within the digits 0-9
        if len(self.scale) != 2 or not 0 <= self.scale[0] < self.scale[1] <= 9:
            raise ConfigError(
                f"rubric scale={list(self.scale)!r}: give [lowest, highest] within 0-9, e.g. [1, 5]."
            )
        if not self.criteria:
            raise ConfigError("rubric criteria: give at least one {name: question} pair.")
        bad = [c for c in self.criteria if not str(c).isidentifier()]
        if bad:
            raise ConfigError(f"rubric criterion {bad[0]!r}: use a plain name (letters, digits, _).")

    def to_json(self) -> dict:
        # a list keeps the criteria in the author's order through sorted-key JSON
        return {"criteria": [[k, v] for k, v in self.criteria.items()], "scale": list(self.scale)}

    @classmethod
    def from_json(cls, data: dict) -> Rubric:
        return cls(dict(data["criteria"]), tuple(data["scale"]))


def load_rubric(path: str | Path | None) -> Rubric:
    """A rubric from YAML in the style of `eval.judge`: `criteria: {name: question}` and `scale: [lo, hi]`
    at the top level or under a `judge:` / `review:` key; None gives the default rubric."""
    if path is None:
        return Rubric()
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"rubric={str(path)!r}: no such file. Give a YAML file with criteria and scale.")
    node = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
    judge_config = isinstance(node, dict) and isinstance(node.get("judge"), dict)
    for key in ("review", "judge"):
        if isinstance(node, dict) and isinstance(node.get(key), dict):
            node = node[key]
    if not isinstance(node, dict) or not isinstance(node.get("criteria"), dict):
        raise ConfigError(f"rubric={str(path)!r}: expected `criteria: {{name: question, ...}}` in the file.")
    unknown = sorted(set(node) - {"criteria", "scale"})
    if unknown and not judge_config:  # a judge config's other settings (backend, model, ...) are not ours
        raise ConfigError(f"rubric={str(path)!r}: unknown key {unknown[0]!r} (have criteria, scale).")
    return Rubric(node["criteria"], tuple(node.get("scale", (1, 5))))


@dataclass
class Item:
    """One prompt and the two answers; `sides` maps "A"/"B" to model labels."""

    id: str
    index: int
    prompt: str
    history: list[dict]
    reference: str
    outputs: dict[str, str]
    sides: dict[str, str]
    judge: dict[str, Any] = field(default_factory=dict)  # model label -> judge verdict, where the judge ran

    def output(self, side: str) -> str:
        return self.outputs[self.sides[side]]


@dataclass
class ReviewSet:
    """Everything a review session shows. `labels` = (reference, candidate): win rates are the candidate's."""

    labels: tuple[str, str]
    sources: dict[str, str]
    seed: int
    rubric: Rubric
    items: list[Item]

    def position(self, item_id: str) -> int | None:
        return next((i for i, it in enumerate(self.items) if it.id == item_id), None)

    def by_id(self) -> dict[str, Item]:
        return {it.id: it for it in self.items}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "labels": list(self.labels),
            "sources": self.sources,
            "seed": self.seed,
            "rubric": self.rubric.to_json(),
            "items": [asdict(it) for it in self.items],
        }
        write_json(path, data)

    @classmethod
    def load(cls, path: Path) -> ReviewSet:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            labels=tuple(data["labels"]),
            sources=data["sources"],
            seed=data["seed"],
            rubric=Rubric.from_json(data["rubric"]),
            items=[Item(**it) for it in data["items"]],
        )


def pair_rows(reference: Sequence[dict], candidate: Sequence[dict], labels: Sequence[str]) -> list[tuple]:
    """Generation rows of the two models matched by example index; the prompts must be the same."""
    by_index = {r["index"]: r for r in candidate}
    pairs = []
    for ref in sorted(reference, key=lambda r: r["index"]):
        cand = by_index.get(ref["index"])
        if cand is None:
            continue
        if (cand.get("history") or cand["prompt"]) != (ref.get("history") or ref["prompt"]):
            raise ConfigError(
                f"example {ref['index']}: {labels[0]} and {labels[1]} answered different prompts "
                f"({ref['prompt'][:60]!r} vs {cand['prompt'][:60]!r}). Review two runs evaluated on the same "
                "test data (the same data.test_path and eval.generate.max_examples)."
            )
        pairs.append((ref, cand))
    return pairs


def build_review_set(
    reference: Sequence[dict],
    candidate: Sequence[dict],
    *,
    labels: tuple[str, str],
    sources: dict[str, str],
    seed: int,
    rubric: Rubric,
    max_items: int | None = None,
) -> ReviewSet:
    """Pair the two models' generation rows and draw each item's sides (seeded)."""
    pairs = pair_rows(reference, candidate, labels)[:max_items]
    if not pairs:
        raise ConfigError(
            f"no example has an answer from both {labels[0]} and {labels[1]}: nothing to review."
        )
    rng = random.Random(seed)
    items = []
    for ref, cand in pairs:
        flip = rng.random() < 0.5
        items.append(
            Item(
                id=str(ref["index"]),
                index=int(ref["index"]),
                prompt=ref["prompt"],
                history=list(ref.get("history") or [{"role": "user", "content": ref["prompt"]}]),
                reference=ref.get("reference") or "",
                outputs={labels[0]: ref["output"], labels[1]: cand["output"]},
                sides={"A": labels[1], "B": labels[0]} if flip else {"A": labels[0], "B": labels[1]},
                judge={
                    lab: row["judge"]
                    for lab, row in zip(labels, (ref, cand), strict=True)
                    if row.get("judge")
                },
            )
        )
    return ReviewSet(tuple(labels), dict(sources), seed, rubric, items)
