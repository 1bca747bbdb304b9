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
import multiprocessing
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from sftlab.data import cache
from sftlab.data.formats import BadRow, Conversation, to_messages
from sftlab.data.packing import pack
from sftlab.data.sources import Row
from sftlab.data.tokenize import Encoded, Template, encode_conversations
from sftlab.errors import DataError


@dataclass
class SplitData:
    """The processed examples of one split plus what happened to every input row."""

    # lists, or the memory-mapped Arrow sequences of cache.py (read one example at a time)
    examples: Sequence[Encoded]
    rows: Sequence[Conversation]  # the conversation of each kept example, for generation-based evaluation
    counts: dict[str, Any]  # rows, kept, truncated, dropped {reason: n}, skipped {reason: n}[, packed_rows]

    @property
    def num_targets(self) -> list[int]:
        if isinstance(self.examples, cache.ArrowExamples):
            return self.examples.column("num_targets")
        return [cache.targets(ex.labels) for ex in self.examples]

    @property
    def lengths(self) -> list[int]:
        if isinstance(self.examples, cache.ArrowExamples):
            return self.examples.lengths()
        return [len(ex.input_ids) for ex in self.examples]


def convert_rows(
    rows: Iterable[Row], fmt: str | None, fields: Mapping[str, str], on_error: str
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


def rows_with_markers(conversations: Sequence[Conversation], markers: Sequence[str]) -> int:
    """Conversations whose message content holds a special-token string (`markers`: quality.special_strings):
    text under template.content_markers=text, control tokens under =special; counted so a user sees them."""
    if not markers:
        return 0

    def text(conv: Conversation) -> str:
        return conv if isinstance(conv, str) else "\n".join(str(m.get("content") or "") for m in conv)

    return sum(any(m in text(c) for m in markers) for c in conversations)


def split_counts(statuses: Counter, skipped: Counter, duplicates: int) -> dict[str, Any]:
    """What happened to every row of a split, from the encoded examples' statuses."""
    dropped = Counter({s: n for s, n in statuses.items() if s not in ("kept", "truncated")})
    if duplicates:
        dropped["duplicate"] = duplicates
    encoded = sum(statuses.values())
    return {
        "rows": encoded + duplicates + sum(skipped.values()),
        "kept": statuses["kept"] + statuses["truncated"],
        "truncated": statuses["truncated"],
        "dropped": dict(sorted(dropped.items())),
        "skipped": dict(sorted(skipped.items())),
    }


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
    """One split in memory (small data, tests); the datamodule streams the same steps into Arrow
    (`encode_kept` + cache.write_split)."""
    encoded = encode_conversations(conversations, template, tokenizer, **encode_kwargs)
    kept = [(e, c) for e, c in zip(encoded, conversations, strict=True) if not e.dropped]
    counts = split_counts(Counter(e.status for e in encoded), skipped, duplicates)
    examples = [e for e, _ in kept]
    if packing:
        examples = pack(examples, encode_kwargs["max_length"])
        counts["packed_rows"] = len(examples)
    return SplitData(examples, [c for _, c in kept], counts)


CHUNK = (
    1000  # conversations per tokenizer call / worker task: big enough to batch, small enough to bound memory
)
_job: dict[str, Any] = {}  # what forked workers encode with (inherited, not pickled per task)


def encode_chunk(
    chunk: Sequence[Conversation],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    **encode_kwargs: Any,
) -> tuple[Counter, Any, Any]:
    """One chunk of a split: (every example's status counted, the kept examples and their conversations as
    Arrow tables). Arrow, not Python lists, so a worker hands the parent a few buffers to write as they
    are, rather than millions of ints to unpickle and convert."""
    encoded = encode_conversations(chunk, template, tokenizer, **encode_kwargs)
    kept = [(e, c) for e, c in zip(encoded, chunk, strict=True) if not e.dropped]
    return Counter(e.status for e in encoded), *cache.arrow_tables(kept)


def _encode_job(chunk: list[Conversation]) -> tuple[Counter, Any, Any]:
    return encode_chunk(chunk, _job["template"], _job["tokenizer"], **_job["kwargs"])


def default_num_proc() -> int:
    """Worker processes for tokenizing: the CPUs this process may use (at most 8; past that the parent,
    which writes the Arrow file, is the bottleneck)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus))


def encoded_chunks(
    conversations: Sequence[Conversation],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_proc: int = 1,
    chunk_size: int | None = None,
    **encode_kwargs: Any,
) -> Iterator[tuple[Counter, Any, Any]]:
    """`encode_chunk` of every chunk of the conversations, in order. With `num_proc` > 1 (and more than one
    chunk) forked workers encode the chunks (as `datasets.map(num_proc=)` does); the parent keeps their
    order, so what is written, counted or raised does not depend on the number of workers."""
    chunk_size = chunk_size or CHUNK
    chunks = (list(conversations[i : i + chunk_size]) for i in range(0, len(conversations), chunk_size))
    if num_proc <= 1 or len(conversations) <= chunk_size:
        for chunk in chunks:
            yield encode_chunk(chunk, template, tokenizer, **encode_kwargs)
        return
    template.bind(tokenizer)
    _job.update(template=template, tokenizer=tokenizer, kwargs=encode_kwargs)
    # The Rust tokenizer's thread pool does not survive a fork: without this each worker warns and turns it
    # off by itself. Restored once the workers exist, for the parent's own calls.
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = multiprocessing.get_context("fork").Pool(num_proc)
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    with pool:
        yield from pool.imap(_encode_job, chunks)
    _job.clear()


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
