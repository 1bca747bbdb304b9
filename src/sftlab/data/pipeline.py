"""Rows to training examples, as pure functions: convert to messages, dedupe, split off validation, encode.

Nothing is dropped silently: per split the counts report rows read, kept, truncated, dropped by reason
(too_long, no_targets, no_targets_after_truncation, duplicate) and skipped by reason (bad rows in
`on_error=skip` mode), with rows == kept + dropped + skipped.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from sftlab.data.formats import BadRow, Conversation, to_messages
from sftlab.data.packing import pack
from sftlab.data.sources import Row
from sftlab.data.tokenize import IGNORE_INDEX, Encoded, Template, encode_conversations
from sftlab.errors import DataError


@dataclass
class SplitData:
    """The processed examples of one split plus what happened to every input row."""

    examples: list[Encoded]
    rows: list[Conversation]  # the conversation of each kept example, for generation-based evaluation
    counts: dict[str, Any]  # rows, kept, truncated, dropped {reason: n}, skipped {reason: n}[, packed_rows]

    @property
    def num_targets(self) -> list[int]:
        return [sum(label != IGNORE_INDEX for label in ex.labels[1:]) for ex in self.examples]


def convert_rows(
    rows: list[Row], fmt: str | None, fields: Mapping[str, str], on_error: str
) -> tuple[list[Conversation], Counter]:
    """Rows -> conversations. Strict (`raise`): the first bad row stops with its file:line and the fix.
    Lenient (`skip`): bad rows are skipped and counted by reason."""
    conversations, skipped = [], Counter()
    for where, row in rows:
        try:
            if isinstance(row, BadRow):
                raise row
            conversations.append(to_messages(row, fmt, where, fields))
        except BadRow as err:
            if on_error == "raise":
                raise DataError(
                    f"{err} (Or set data.on_error=skip to skip bad rows; they are counted by reason.)"
                ) from None
            skipped[err.reason] += 1
    return conversations, skipped


def dedupe(conversations: list[Conversation]) -> tuple[list[Conversation], int]:
    """Exact duplicates (same messages) after format conversion; the first occurrence is kept."""
    seen, out = set(), []
    for conv in conversations:
        key = json.dumps(conv, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            out.append(conv)
    return out, len(conversations) - len(out)


def split_off(
    conversations: list[Conversation], fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val): a seeded random `fraction` (at least one example) becomes the validation split."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = max(1, math.floor(fraction * len(order))) if order else 0
    val = set(order[:n_val])
    return (
        [c for i, c in enumerate(conversations) if i not in val],
        [c for i, c in enumerate(conversations) if i in val],
    )


def encode_split(
    conversations: list[Conversation],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    *,
    skipped: Counter,
    duplicates: int,
    packing: bool,
    **encode_kwargs: Any,
) -> SplitData:
    encoded = encode_conversations(conversations, template, tokenizer, **encode_kwargs)
    kept = [(e, c) for e, c in zip(encoded, conversations, strict=True) if not e.dropped]
    dropped = Counter(e.status for e in encoded if e.dropped)
    if duplicates:
        dropped["duplicate"] = duplicates
    counts: dict[str, Any] = {
        "rows": len(encoded) + duplicates + sum(skipped.values()),
        "kept": len(kept),
        "truncated": sum(e.status == "truncated" for e in encoded),
        "dropped": dict(sorted(dropped.items())),
        "skipped": dict(sorted(skipped.items())),
    }
    examples = [e for e, _ in kept]
    if packing:
        examples = pack(examples, encode_kwargs["max_length"])
        counts["packed_rows"] = len(examples)
    return SplitData(examples, [c for _, c in kept], counts)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building millions of small lists and dicts: with a model
    library's ~600k objects on the heap its repeated full scans cost ~10x the conversion itself, and this
    code creates no reference cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
