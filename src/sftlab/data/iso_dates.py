"""The bundled dataset: convert dates written in English to ISO 8601 (YYYY-MM-DD).

Why this task: answers are checked exactly, SmolLM2-135M-Instruct gets almost all wrong before tuning and
almost all right after a few CPU minutes of LoRA, so the default run shows learning, not just a falling loss.
The files under sftlab/resources/iso_dates/ are this generator's output (a test checks it); regenerate with
`python -m sftlab.data.iso_dates`. License: the project's own (Apache-2.0).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

SPLITS = {"train": 800, "val": 100, "test": 100}
OUT_DIR = Path(__file__).resolve().parents[1] / "resources" / "iso_dates"
PROMPT = "Convert this date to ISO 8601 (YYYY-MM-DD): {date}"


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


STYLES = [
    lambda d: f"{d:%B} {d.day}, {d.year}",
    lambda d: f"{d.day} {d:%B} {d.year}",
    lambda d: f"{d:%b} {d.day}, {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {d:%B}, {d.year}",
    lambda d: f"{d:%B} {_ordinal(d.day)} {d.year}",
    lambda d: f"{d:%A}, {d:%B} {d.day}, {d.year}",
    lambda d: f"{d.year}, {d:%B} {d.day}",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year} (day.month.year)",
]


def generate(seed: int = 0) -> dict[str, list[dict]]:
    """Deterministic splits with no date shared between them."""
    rng = random.Random(seed)
    start, span = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    days = rng.sample(range(span + 1), sum(SPLITS.values()))
    rows = []
    for offset in days:
        date = start + dt.timedelta(days=offset)
        text = rng.choice(STYLES)(date)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": PROMPT.format(date=text)},
                    {"role": "assistant", "content": date.isoformat()},
                ]
            }
        )
    out, i = {}, 0
    for split, n in SPLITS.items():
        out[split], i = rows[i : i + n], i + n
    return out


def write(out_dir: Path = OUT_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in generate().items():
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


if __name__ == "__main__":
    write()
