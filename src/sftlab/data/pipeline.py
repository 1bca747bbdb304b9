"""Rows to training examples, as pure functions: convert to messages, dedupe, split off validation, encode.

Nothing is dropped silently: per split the counts report rows read, kept, truncated, dropped by reason
(too_long, no_targets, no_targets_after_truncation, duplicate) and skipped by reason (bad rows in
`on_error=skip` mode), with rows == kept + dropped + skipped.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import json
import math
import multiprocessing
import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import xxhash
from transformers import PreTrainedTokenizerBase

from sftlab.data import cache
from sftlab.data.formats import BadRow, Conversation, to_messages
from sftlab.data.packing import pack
from sftlab.data.sources import RawChunk, Row, exact_loads, parse_chunk
from sftlab.data.tokenize import Encoded, Template, encode_conversations, encode_rows
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
        key = to_json(conv, sort_keys=True)  # the text `_dedupe_key` hashes
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

    # Most chunks hold no marker at all: one search per marker over the whole chunk says so.
    pieces: list[str] = []
    for conv in conversations:
        if isinstance(conv, str):
            pieces.append(conv)
        else:
            pieces += [str(m.get("content") or "") for m in conv]
    whole = "\n".join(pieces)
    # First characters ("<", "[") are rare in most text: one memchr-like scan each rules most chunks out.
    if not any(c in whole for c in {m[:1] for m in markers}) or not any(m in whole for m in markers):
        return 0
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


CHUNK = 1000  # rows per worker task / tokenizer call: big enough to batch, small enough to bound memory
# The standard library's encoders, built once (json.dumps builds one per call for any non-default argument).
_std_json = json.JSONEncoder(ensure_ascii=False).encode
_std_sorted_json = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode
_job: dict[str, Any] = {}  # what forked workers convert and encode with (inherited, not pickled per task)
_opened: dict[tuple, Any] = {}  # converted files opened (reader, batch starts), by (process, path)


def to_json(conversation: Conversation, *, sort_keys: bool = False) -> bytes:
    """A conversation as the UTF-8 JSON text the cache stores (`sort_keys`: what `dedupe` compares).

    orjson where its text reads back as exactly what was converted (most rows: it takes a twentieth of the
    standard library's time, which was a sixth of the Python around the tokenizer); the standard library
    where orjson's text holds a null (it writes a non-finite float, which Python's json reads and writes as
    NaN, as null; a real null or the word in a string only costs the slower path) or where orjson refuses
    (an integer past 64 bits, a key that is not a string). Conversion has already refused lone surrogates,
    the one string orjson cannot write."""
    with contextlib.suppress(TypeError):
        text = orjson.dumps(conversation, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
        if b"null" not in text:
            return text
    return (_std_sorted_json if sort_keys else _std_json)(conversation).encode()


def convert_chunk(
    chunk: RawChunk, fmt: str | None, fields: Mapping[str, str], on_error: str, keys: bool
) -> tuple[Counter, list[bytes], bytes]:
    """Raw rows -> (skipped counts, each conversation as JSON text, and with `keys` the 16-byte dedupe key
    of each: a hash of the conversation with sorted keys, what `dedupe` compares)."""
    conversations, skipped = convert_rows(parse_chunk(chunk), fmt, fields, on_error)
    texts = [to_json(c) for c in conversations]
    digests = b"".join(_dedupe_key(c) for c in conversations) if keys else b""
    return skipped, texts, digests


def _dedupe_key(conversation: Conversation) -> bytes:
    return xxhash.xxh3_128_digest(to_json(conversation, sort_keys=True))


def first_occurrences(digests: bytes) -> np.ndarray:
    """Indices of the first row with each 16-byte key, in order: `dedupe` over keys (16 bytes a row)."""
    keys = np.frombuffer(digests, dtype=[("a", "<u8"), ("b", "<u8")])
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`split_off` over positions 0..n-1: (train, val) positions, each ascending."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = max(1, math.floor(fraction * n)) if n else 0
    val = np.zeros(n, dtype=bool)
    val[order[:n_val]] = True
    positions = np.arange(n)
    return positions[~val], positions[val]


def encode_chunk(
    texts: Sequence[bytes],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    markers: Sequence[str] = (),
    **encode_kwargs: Any,
) -> tuple[Counter, Any, Any, int]:
    """Conversations (JSON text) -> (every example's status counted, the kept examples and their
    conversations as Arrow tables, the conversations holding a special-token string). Arrow, not Python
    lists, so a worker hands the parent a few buffers to write as they are, rather than millions of ints
    to unpickle and convert."""
    chunk = [exact_loads(t) for t in texts]
    return encode_converted(chunk, texts, template, tokenizer, markers, **encode_kwargs)


def encode_converted(
    conversations: Sequence[Conversation],
    texts: Sequence[bytes] | None,
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    markers: Sequence[str] = (),
    **encode_kwargs: Any,
) -> tuple[Counter, Any, Any, int]:
    """`encode_chunk` of conversations, with their JSON texts or None (made here for the kept ones)."""
    encoded = encode_rows(conversations, template, tokenizer, **encode_kwargs)
    kept = encoded.kept
    kept_texts = [to_json(conversations[k]) if texts is None else texts[k] for k in np.flatnonzero(kept)]
    tables = cache.arrow_tables(encoded.select(kept), kept_texts)
    return encoded.statuses(), *tables, rows_with_markers(conversations, markers)


def convert_encode_chunk(
    chunk: RawChunk,
    convert: tuple,
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    markers: Sequence[str] = (),
    **encode_kwargs: Any,
) -> tuple[Counter, Counter, Any, Any, int]:
    """`convert_chunk` (with `convert` = its format, fields, on_error) then `encode_chunk` in one task, for
    a split that is neither deduplicated nor split: (skipped counts, *what `encode_chunk` returns). The
    conversations are encoded as they are converted, without their JSON round trip through a file."""
    fmt, fields, on_error = convert[:3]
    conversations, skipped = convert_rows(parse_chunk(chunk), fmt, fields, on_error)
    return skipped, *encode_converted(conversations, None, template, tokenizer, markers, **encode_kwargs)


def _convert_job(chunk: RawChunk) -> tuple[Counter, list[bytes], bytes]:
    return convert_chunk(chunk, *_job["convert"])


def _convert_encode_job(chunk: RawChunk) -> tuple[Counter, Counter, Any, Any, int]:
    return convert_encode_chunk(
        chunk, _job["convert"], _job["template"], _job["tokenizer"], _job["markers"], **_job["kwargs"]
    )


def _encode_job(task: tuple[str | None, Any]) -> tuple[Counter, Any, Any, int]:
    """A chunk of JSON texts, or (converted file, ascending row indices) to read them from."""
    path, rows = task
    if path is not None:
        rows = read_converted(Path(path), rows)
    return encode_chunk(rows, _job["template"], _job["tokenizer"], _job["markers"], **_job["kwargs"])


def default_num_proc() -> int:
    """Worker processes for tokenizing: the CPUs this process may use (at most 8; past that the parent,
    which writes the Arrow file, is the bottleneck)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus))


class Workers:
    """Forked worker processes that run the pipeline's jobs over a stream of tasks, results in task order
    (so what is written, counted or raised does not depend on the number of workers, as with
    `datasets.map(num_proc=)`). At most two tasks per worker are in flight, so a stream of a million rows
    is never queued whole (`Pool.imap` would read its whole input ahead). The pool is forked at the first
    stream of more than one task; until then, and with `num_proc=1`, jobs run in this process.

    With a `scratch` directory, a worker leaves the Arrow tables of its result there as files for this
    process to map (`Spilled`), rather than sending them through the pool's pipe: a pipe holds 64 KB, so
    a chunk's megabyte went through in a few dozen reads and writes, each side copying it once more (0.80
    against 0.51 s of this process's CPU for 100 000 rows)."""

    def __init__(self, num_proc: int, scratch: Path | None = None, **job: Any) -> None:
        self.num_proc, self.scratch, self.job, self.pool = num_proc, scratch, job, None

    def __enter__(self) -> Workers:
        _job.update(self.job)
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if self.pool is not None and exc_type is None:
            # Every result is in; the workers exit once they see the closed queue. Joined in the background:
            # each exit unmaps a forked copy of this process (10 ms apiece here), which the caller need not
            # wait for.
            self.pool.close()
            threading.Thread(target=self.pool.join, name="sftlab-workers-exit", daemon=True).start()
        elif self.pool is not None:  # a bad row, Ctrl-C: stop the tasks still running
            self.pool.terminate()
            self.pool.join()
        _job.clear()
        _opened.clear()

    def _fork(self) -> Any:
        if "template" in self.job:
            self.job["template"].bind(self.job["tokenizer"])
        # Import what every worker needs (pyarrow, for the cache's tables) once, here, rather than once per
        # worker.
        import pyarrow  # noqa: F401

        # The Rust tokenizer's thread pool does not survive a fork: without this each worker warns and turns
        # it off by itself. Restored once the workers exist, for the parent's own calls.
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            return multiprocessing.get_context("fork").Pool(self.num_proc)
        finally:
            if before is None:
                os.environ.pop("TOKENIZERS_PARALLELISM")
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        tasks = iter(tasks)
        first = next(tasks, _END)
        second = next(tasks, _END) if first is not _END else _END
        if self.num_proc <= 1 or second is _END:
            for task in itertools.chain([first, second], tasks):
                if task is not _END:
                    yield fn(task)
            return
        if self.pool is None:
            self.pool = self._fork()
        scratch = None if self.scratch is None else str(self.scratch)
        pending: collections.deque = collections.deque()
        for task in itertools.chain([first, second], tasks):
            pending.append(self.pool.apply_async(_pooled, (fn, task, scratch)))
            if len(pending) >= 2 * self.num_proc:
                yield _unspilled(pending.popleft().get())
        while pending:
            yield _unspilled(pending.popleft().get())

    def convert(self, chunks: Iterable[RawChunk]) -> Iterator[tuple[Counter, list[bytes], bytes]]:
        """`convert_chunk` of each raw chunk, with the job's (format, fields, on_error, dedupe keys)."""
        return self.map(_convert_job, chunks)

    def encode(self, tasks: Iterable[tuple[str | None, Any]]) -> Iterator[tuple[Counter, Any, Any, int]]:
        """`encode_chunk` of each (converted file, row indices) or (None, JSON texts) task."""
        return self.map(_encode_job, tasks)

    def convert_encode(self, chunks: Iterable[RawChunk]) -> Iterator[tuple[Counter, Counter, Any, Any, int]]:
        """`convert_encode_chunk` of each raw chunk."""
        return self.map(_convert_encode_job, chunks)


_END = object()


@dataclass(frozen=True)
class Spilled:
    """An Arrow table a worker wrote to a file for the parent, which maps it and removes the file."""

    path: str

    def load(self) -> Any:
        import pyarrow as pa

        table = pa.ipc.open_stream(pa.memory_map(self.path)).read_all()
        os.unlink(self.path)  # the mapping stays valid until the table is dropped
        return table


def _pooled(fn: Callable[[Any], Any], task: Any, scratch: str | None) -> Any:
    """`fn(task)` in a worker; with `scratch`, the result's Arrow tables are spilled there (see Workers)."""
    result = fn(task)
    if scratch is None or not isinstance(result, tuple):
        return result
    import pyarrow as pa

    out = []
    for item in result:
        if isinstance(item, pa.Table):
            path = os.path.join(scratch, f".spill-{os.getpid()}-{next(_spills)}.arrow")
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, item.schema) as writer:
                writer.write_table(item)
            item = Spilled(path)
        out.append(item)
    return tuple(out)


def _unspilled(result: Any) -> Any:
    if not isinstance(result, tuple):
        return result
    return tuple(item.load() if isinstance(item, Spilled) else item for item in result)


_spills = itertools.count()


def encoded_chunks(
    conversations: Sequence[Conversation],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_proc: int = 1,
    chunk_size: int | None = None,
    **encode_kwargs: Any,
) -> Iterator[tuple[Counter, Any, Any, int]]:
    """`encode_chunk` of every chunk of a list of conversations, in order, by `num_proc` workers."""
    chunk_size = chunk_size or CHUNK
    texts = [to_json(c) for c in conversations]
    tasks = ((None, texts[i : i + chunk_size]) for i in range(0, len(texts), chunk_size))
    job = {"template": template, "tokenizer": tokenizer, "markers": (), "kwargs": encode_kwargs}
    with Workers(num_proc, **job) as workers:
        yield from workers.encode(tasks)


def write_converted(path: Path, chunks: Iterable[list[bytes]]) -> int:
    """Conversations (JSON text) appended to one Arrow IPC file, a record batch per chunk, with the first
    row of each batch in `<path>.starts.npy`; returns the count. Where a split's converted rows wait for
    dedupe and the split, on disk rather than in memory."""
    import pyarrow as pa

    schema = pa.schema([("json", pa.string())])
    starts = [0]
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for texts in chunks:
            if texts:
                writer.write_batch(pa.record_batch([pa.array(texts, pa.string())], schema=schema))
                starts.append(starts[-1] + len(texts))
    np.save(_starts_file(path), np.array(starts, dtype=np.int64))
    return starts[-1]


def _starts_file(path: Path) -> Path:
    return path.with_name(path.name + ".starts.npy")


def read_converted(path: Path, rows: np.ndarray) -> list[bytes]:
    """The JSON texts of `rows` (ascending) of a `write_converted` file. Only the record batches that hold
    them are read, with plain reads: a worker's memory holds one batch at a time, where a memory map of
    the whole file would leave every page it touched resident in the worker."""
    import pyarrow as pa

    key = (os.getpid(), str(path))  # a forked worker opens its own, never shares the parent's descriptor
    if key not in _opened:
        _opened[key] = (pa.ipc.open_file(pa.OSFile(str(path))), np.load(_starts_file(path)))
    reader, starts = _opened[key]
    batch_of = np.searchsorted(starts, rows, side="right") - 1
    texts: list[bytes] = []
    for b in np.unique(batch_of):
        column = reader.get_batch(int(b)).column(0)
        texts += column.take(pa.array(rows[batch_of == b] - starts[b])).cast(pa.binary()).to_pylist()
    return texts


def remove_converted(path: Path) -> None:
    path.unlink(missing_ok=True)
    _starts_file(path).unlink(missing_ok=True)


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
