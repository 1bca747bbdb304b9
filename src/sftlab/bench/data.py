"""Generated data sets: varied-length conversations (so padding matters) and alpaca rows (data preparation).

Deterministic for a seed; plain words, so the token count grows with the word count.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

_WORD_TEXT = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education"
)
WORDS = _WORD_TEXT.split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def varied_conversations(n: int, seed: int = 0, max_words: int = 70) -> list[dict]:
    """`n` single-turn conversations whose lengths spread from a few to about 230 SmolLM2 tokens: "reverse
    these k words", k uniform in [1, max_words]; the answer is as long as the question."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = _words(rng, rng.randint(1, max_words)).split()
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "Write these words in reverse order: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))},
                ]
            }
        )
    return rows


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` alpaca rows (instruction, input, output), a third with an empty input, as alpaca itself has."""
    return list(iter_alpaca_rows(n, seed))


def iter_alpaca_rows(n: int, seed: int = 0) -> Iterator[dict]:
    """`alpaca_rows` one at a time (a million rows written without holding them)."""
    rng = random.Random(seed)
    for k in range(n):
        yield {
            "instruction": "Summarize: " + _words(rng, rng.randint(3, 30)),
            "input": "" if k % 3 == 0 else _words(rng, rng.randint(5, 60)),
            "output": _words(rng, rng.randint(3, 80)),
        }


def write_jsonl(rows: Iterable[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def read_conversations(path: str | Path) -> list[list[dict]]:
    """The `messages` of every row of a messages-format JSONL file (the bundled and generated sets)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]
