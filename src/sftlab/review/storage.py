"""`ratings.jsonl`: every rating, one JSON line each, appended and fsync'ed before the page is told it was
saved. Nothing is ever rewritten: rating an item again appends a new line, and readers take the latest line
per (reviewer, item). A line torn by a kill mid-write is skipped when read and sealed off before the next
append, so one lost keystroke never costs an acknowledged rating.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from sftlab.rundir.redact import redact

log = logging.getLogger(__name__)


class RatingLog:
    """The append-only rating file of one review directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, rating: dict) -> None:
        """Durable on return: written, flushed and fsync'ed."""
        line = json.dumps(rating, ensure_ascii=False, sort_keys=True) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a torn last line: end it so this rating starts a line of its own
                        f.write(b"\n")
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())

    def read(self) -> list[dict]:
        """Every complete rating line, in file order."""
        if not self.path.is_file():
            return []
        ratings = []
        with self._lock:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                ratings.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d: not a complete rating (torn by a kill?); skipped", self.path, number)
        return ratings

    def latest(self) -> list[dict]:
        """The last rating of each (reviewer, item), in the order first rated."""
        return latest(self.read())

    def rated(self, reviewer: str) -> set[str]:
        return {r["item"] for r in self.read() if r.get("reviewer") == reviewer}


def latest(ratings: list[dict]) -> list[dict]:
    keep: dict[tuple[str, str], dict] = {}
    for r in ratings:
        keep[(r["reviewer"], r["item"])] = r
    return list(keep.values())


def write_json(path: Path, data: Any) -> None:
    """Atomically (a reader never sees half a file), secrets masked: `rundir.write.write_json` without the
    torch and transformers that module loads, so the review page starts in a second."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(redact(data), indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
