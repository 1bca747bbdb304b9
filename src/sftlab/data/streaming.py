"""Streaming training data (`data.streaming=true`): rows are read, converted, tokenized and (packed) while
training runs, for data larger than the disk or the patience. Nothing is cached and no pass over the whole
set happens before the first step.

The steps are the map-style path's own (sources -> formats.to_messages -> tokenize.encode_conversations ->
packing.pack), applied to one optimizer step's worth of rows at a time:

  * **Readers** (`SourceStream`): a local `.jsonl` file (or JSON Lines under `.json`) is read line by line
    from a byte offset, `.csv` record by record, `.parquet` files and hub ids through
    `datasets.load_dataset(..., streaming=True)`. Several sources are read one after the other. A JSON
    array cannot be read lazily (it is one value): it is refused, with the command that converts it.
  * **Order** (`ShuffleBuffer`): with `data.shuffle=true` a seeded buffer of `data.shuffle_buffer` rows (the
    algorithm of `datasets.IterableDataset.shuffle(seed, buffer_size)`): each incoming row takes the place of
    a random buffered row, which is emitted. The seed is `data.seed + epoch`. Same seed, same order.
  * **Steps** (`TrainStream`): an optimizer step (`batch_size * accumulate_grad_batches * world_size`
    examples, or rows when packing) is assembled whole before its first micro-batch is yielded, so every
    micro-batch carries the step's total target count and the loss is normalized by it exactly as on the
    map-style path. Packing fills the step's rows best-fit in arrival order; the first example that fits
    in none of them opens the next step.
  * **Exact resume**: before drawing each step the stream records where it stands (each source's position:
    byte offset, record count or `datasets`' own `state_dict()`; the shuffle buffer's rows and its RNG state;
    the conversations carried over to the next step; the counts). A checkpoint stores the record of the step
    Lightning was about to train (Lightning fetches ahead, so the stream itself is further on) and the
    micro-batches of that step already trained; a resumed run starts the stream there. The shuffle buffer's
    rows travel in the checkpoint as JSON, so a checkpoint grows by about `shuffle_buffer` rows of text.

Validation comes from `data.val_path` (processed and cached as usual) or, with `data.val_size=N`, from the
first N rows of the training source (`hold_out`), after which every pass starts.

Tokenization runs in the training process (`data.num_proc` does not apply; `data.num_workers` must be 0):
a step's rows are encoded in one batched tokenizer call while the accelerator waits, which on a GPU costs a
few percent of a step for chat-sized rows.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedTokenizerBase

from sftlab.config import streaming_problems
from sftlab.data import cache
from sftlab.data.collate import collate
from sftlab.data.formats import Conversation
from sftlab.data.packing import pack
from sftlab.data.pipeline import SplitData, convert_rows, rows_with_markers, split_counts
from sftlab.data.quality import special_strings
from sftlab.data.sampler import split_evenly
from sftlab.data.sources import (
    HUB_SPLITS,
    Row,
    Source,
    _local_file,
    iter_csv_rows,
    load_with_datasets,
    parse_jsonl_line,
)
from sftlab.data.tokenize import Encoded, Template, encode_conversations
from sftlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)
PREVIEW = 64  # examples of the unshuffled stream kept in memory: resume's data fingerprint, sftlab-inspect
KEEP_SNAPSHOTS = 8  # steps whose start is remembered; Lightning is never more than one micro-batch ahead


# ---- readers ---------------------------------------------------------------------------------------------
class SourceStream:
    """The rows of one source, read lazily from `position` (None: the start). `position` is updated as rows
    are yielded: after row k it is where row k + 1 starts, so a stream rebuilt from it continues exactly."""

    def __init__(self, source: Source, key: str, split: str, position: Any = None) -> None:
        self.source, self.key, self.split = source, key, split
        self.file = _local_file(source.path, key)
        self.position = position
        if self.file is not None and self.file.suffix not in (".jsonl", ".json", ".csv", ".parquet"):
            raise DataError(f"{key}={source.path!r}: unknown file type; use .jsonl, .json, .csv or .parquet.")
        if self.file is not None and self.file.suffix == ".json" and _is_json_array(self.file):
            raise DataError(
                f"{key}={source.path!r}: a JSON array is one value and cannot be streamed. Convert it to "
                f"JSON Lines (jq -c '.[]' {self.file.name} > {self.file.stem}.jsonl) and point {key} at "
                "that, or set data.streaming=false."
            )

    def __iter__(self) -> Iterator[Row]:
        if self.file is not None and self.file.suffix in (".jsonl", ".json"):
            return self._jsonl()
        if self.file is not None and self.file.suffix == ".csv":
            return self._csv()
        return self._datasets()

    def _jsonl(self) -> Iterator[Row]:
        offset, lineno = self.position or (0, 0)
        with open(self.file, "rb") as f:
            f.seek(offset)
            while raw := f.readline():
                lineno += 1
                row = parse_jsonl_line(self.file, lineno, raw)
                self.position = [f.tell(), lineno]
                if row is not None:
                    yield row

    def _csv(self) -> Iterator[Row]:
        # csv's reader hides the file offset (it reads ahead), so the position is a record count and a resume
        # re-reads the records before it: cheap next to tokenizing them.
        done = self.position or 0
        for k, row in enumerate(iter_csv_rows(self.file)):
            if k >= done:
                self.position = k + 1
                yield row

    def _datasets(self) -> Iterator[Row]:
        ds = self._load()
        state, index = self.position or (None, 0)
        if state is not None:
            ds.load_state_dict(state)
        name = str(self.file) if self.file is not None else f"{self.source.path}[{self._split()}]"
        for row in ds:
            self.position = [ds.state_dict(), index + 1]
            yield f"{name} row {index}", row
            index += 1

    def _split(self) -> str:
        return self.source.split or HUB_SPLITS[self.split]

    def _load(self) -> Any:
        return load_with_datasets(self.source, self.file, HUB_SPLITS[self.split], self.key, streaming=True)


def _is_json_array(file: Path) -> bool:
    with open(file, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


class Rows:
    """The rows of several sources, one after the other, each tagged with its ordinal in this epoch (the
    sample id that `batch["index"]` reports). `state()` / the `state` argument: where it stands."""

    def __init__(self, sources: Sequence[Source], split: str, state: dict | None = None) -> None:
        self.sources, self.split = list(sources), split
        state = state or {"source": 0, "position": None, "read": 0}
        self.index, self.read = state["source"], state["read"]
        self.current = self._open(self.index, state["position"])

    def _open(self, k: int, position: Any) -> SourceStream | None:
        if k >= len(self.sources):
            return None
        return SourceStream(self.sources[k], f"data.{self.split}_path", self.split, position)

    def state(self) -> dict:
        position = self.current.position if self.current is not None else None
        return {"source": self.index, "position": position, "read": self.read}

    def __iter__(self) -> Iterator[tuple[int, Row]]:
        while self.current is not None:
            for row in self.current:
                self.read += 1
                yield self.read - 1, row
            self.index += 1
            self.current = self._open(self.index, None)


class ShuffleBuffer:
    """Seeded buffer shuffle over a row iterator, as `datasets.IterableDataset.shuffle(seed, buffer_size)`
    does it; unlike that one (whose buffer is refilled, not restored, on resume) its buffer and RNG are
    part of `state()`, so a resumed stream emits exactly what the uninterrupted one would have."""

    def __init__(self, size: int, seed: int, state: dict | None = None) -> None:
        self.size = size
        self.rng = random.Random(seed)
        self.buffer: list[Any] = []
        if state is not None:
            self.buffer = [tuple(item) for item in json.loads(state["buffer"])]
            self.rng.setstate(_as_tuple(state["rng"]))

    def state(self) -> dict:
        """Taken between two emitted rows (so cheap: a list copy; serialized when a checkpoint is saved)."""
        return {"buffer": list(self.buffer), "rng": self.rng.getstate()}

    def __call__(self, rows: Iterator[Any]) -> Iterator[Any]:
        for row in rows:
            if len(self.buffer) < self.size:
                self.buffer.append(row)
                continue
            k = self.rng.randrange(self.size)
            out, self.buffer[k] = self.buffer[k], row
            yield out
        while self.buffer:  # the source is done: drain in random order
            k = self.rng.randrange(len(self.buffer))
            self.buffer[k], self.buffer[-1] = self.buffer[-1], self.buffer[k]
            yield self.buffer.pop()


def _as_tuple(value: Any) -> Any:
    """random.Random state from its JSON/checkpoint form (lists) back to the tuples setstate wants."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


# ---- steps -----------------------------------------------------------------------------------------------
class TrainStream(IterableDataset):
    """The training split as a stream of micro-batches (lists of the collate function's features), whole
    optimizer steps at a time. See the module docstring."""

    def __init__(
        self,
        sources: Sequence[Source],
        template: Template,
        tokenizer: PreTrainedTokenizerBase,
        *,
        fmt: str | None,
        fields: dict,
        on_error: str,
        encode_kwargs: dict,
        packing: bool,
        batch_size: int,
        shuffle: bool,
        shuffle_buffer: int,
        seed: int,
        max_drop_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        self.sources, self.template, self.tokenizer = list(sources), template, tokenizer
        self.fmt, self.fields, self.on_error = fmt, fields, on_error
        self.encode_kwargs, self.packing = dict(encode_kwargs), packing
        self.batch_size, self.shuffle, self.shuffle_buffer, self.seed = (
            batch_size,
            shuffle,
            shuffle_buffer,
            seed,
        )
        self.max_drop_ratio = max_drop_ratio
        self.accumulate, self.world_size, self.rank = 1, 1, 0
        self.epoch_of: Callable[[], int] = lambda: 0
        self.counts: dict[str, Any] = split_counts(Counter(), Counter(), 0)
        self._statuses: Counter = Counter()
        self._skipped: Counter = Counter()
        self._markers, self._with_markers = special_strings(tokenizer), 0
        self._snapshots: dict[tuple[int, int], dict] = {}
        self._resume: dict | None = None
        self._start: dict | None = None  # where every pass starts: after the rows held out for validation

    def configure(self, *, accumulate: int, world_size: int, rank: int, epoch_of: Callable[[], int]) -> None:
        """The trainer's side of the plan: micro-batches per step, ranks, and the epoch being trained."""
        self.accumulate, self.world_size, self.rank, self.epoch_of = accumulate, world_size, rank, epoch_of

    # ---- resume ------------------------------------------------------------------------------------------
    def state_dict(self, epoch: int, consumed: int) -> dict:
        """Where to continue after `consumed` trained micro-batches of `epoch`: the record taken at the start
        of their last step, and how many of that step's micro-batches were trained."""
        step, into = divmod(consumed, self.accumulate)
        snap = self._snapshots.get((epoch, step))
        if snap is None and all(e < epoch for e, _ in self._snapshots):
            # Saved at the end of a pass, after Lightning counted the next epoch: that pass starts afresh.
            return {}
        if snap is None:
            raise RuntimeError(
                f"streaming: no record of step {step} of epoch {epoch} (have {sorted(self._snapshots)}); "
                "the checkpoint cannot hold an exact stream position"
            )
        buffer = snap["shuffle"]["buffer"] if snap["shuffle"] else None
        try:
            shuffle = (
                {"buffer": json.dumps(buffer), "rng": snap["shuffle"]["rng"]} if buffer is not None else None
            )
            pending = json.dumps(snap["pending"])
        except TypeError as err:
            raise DataError(
                f"streaming: a row in the shuffle buffer is not JSON ({err}); the checkpoint cannot hold it. "
                "Select text columns with data.fields, or set data.shuffle=false."
            ) from None
        return {
            "epoch": epoch,
            "step": step,
            "into_step": into,
            "rows": snap["rows"],
            "shuffle": shuffle,
            "pending": pending,
            "statuses": dict(snap["statuses"]),
            "skipped": dict(snap["skipped"]),
            "chat_markers": snap["chat_markers"],
            "settings": self._order_settings(),
        }

    def load_state_dict(self, state: dict) -> None:
        """A state saved with another order (shuffle, buffer, seed) would continue a different stream: refused
        naming each key (the other settings the stream depends on are checked by the resume check)."""
        if state:
            saved = state.get("settings", {})
            diffs = [
                f"data.{k}: {saved.get(k)!r} in the checkpoint, {v!r} now"
                for k, v in self._order_settings().items()
                if saved.get(k) != v
            ]
            if diffs:
                raise ConfigError(
                    "resume: the checkpoint's stream was read in another order, so this launch cannot "
                    f"continue it exactly ({'; '.join(diffs)}). Resume with the checkpoint's values."
                )
        self._resume = state or None

    def _order_settings(self) -> dict[str, Any]:
        return {"shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer, "seed": self.seed}

    # ---- iteration ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[dict]]:
        epoch = self.epoch_of()
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] != epoch:
            resume = None  # the checkpoint closed that epoch: this one starts from the beginning
        rows = Rows(self.sources, "train", resume["rows"] if resume else self._start)
        shuffler = None
        if self.shuffle and self.shuffle_buffer > 1:
            state = resume["shuffle"] if resume else None
            shuffler = ShuffleBuffer(self.shuffle_buffer, self.seed + epoch, state)
        # Conversations, not raw rows, go through the buffer: they are JSON (raw rows may not be: a bad line,
        # a hub row's binary column), so the buffer can be saved in a checkpoint.
        stream = self._conversations(rows)
        if shuffler is not None:
            stream = shuffler(stream)
        pending = [tuple(p) for p in json.loads(resume["pending"])] if resume else []
        step, skip = (resume["step"], resume["into_step"]) if resume else (0, 0)
        self._statuses = Counter(resume["statuses"]) if resume else Counter()
        self._skipped = Counter(resume["skipped"]) if resume else Counter()
        self._with_markers = resume["chat_markers"] if resume else 0
        self._update_counts()
        while True:
            self._snapshots[(epoch, step)] = {
                "rows": rows.state(),
                "shuffle": shuffler.state() if shuffler else None,
                "pending": list(pending),
                "statuses": Counter(self._statuses),
                "skipped": Counter(self._skipped),
                "chat_markers": self._with_markers,
            }
            for old in [k for k in self._snapshots if k < (epoch, step - KEEP_SNAPSHOTS)]:
                del self._snapshots[old]
            examples = self._draw_step(stream, pending)
            self._update_counts()
            micro_batches = self._rank_micro_batches(examples)
            if not micro_batches:
                return
            total = sum(cache.targets(ex.labels) for _, ex in examples)
            for mb in micro_batches[skip:]:
                yield [_features(i, ex, total) for i, ex in mb]
            skip = 0
            step += 1

    def _conversations(self, rows: Rows) -> Iterator[tuple[int, Conversation]]:
        """Rows -> (ordinal, conversation); bad rows raise (file:line) or are skipped and counted."""
        for index, row in rows:
            convs, bad = convert_rows([row], self.fmt, self.fields, self.on_error)
            self._skipped.update(bad)
            self._with_markers += rows_with_markers(convs, self._markers)
            for conv in convs:
                yield index, conv

    def _draw_step(
        self, stream: Iterator[tuple[int, Conversation]], pending: list
    ) -> list[tuple[int, Encoded]]:
        """One global step's examples (packed rows when packing), fewer only where the stream ends.
        `pending`: conversations drawn but not placed (packing); taken first, refilled with what is left."""
        size = self.batch_size * self.accumulate * self.world_size
        max_length = self.encode_kwargs["max_length"]
        step: list[list[tuple[int, Encoded]]] = []  # unpacked: one example per entry; packed: one row
        free: list[int] = []  # packing: tokens left in each row of `step`
        while True:
            need = size - len(step) if not self.packing else size
            drawn = pending[:need]
            del pending[:need]
            drawn += itertools.islice(stream, need - len(drawn))
            if not drawn:
                break
            convs = [c for _, c in drawn]
            encoded = encode_conversations(convs, self.template, self.tokenizer, **self.encode_kwargs)
            full = False
            for k, ((index, _), ex) in enumerate(zip(drawn, encoded, strict=True)):
                if ex.dropped:
                    self._statuses[ex.status] += 1
                    continue
                if not self.packing:
                    step.append([(index, ex)])
                else:
                    n = len(ex.input_ids)
                    fits = [r for r, room in enumerate(free) if room >= n]
                    if fits:
                        row = min(fits, key=lambda r: (free[r], r))  # best fit: the fullest row it fits in
                    elif len(step) < size:
                        step.append([])
                        free.append(max_length)
                        row = len(step) - 1
                    else:  # fits nowhere: it and the rest open the next step
                        pending[:0] = drawn[k:]
                        full = True
                        break
                    step[row].append((index, ex))
                    free[row] -= n
                self._statuses[ex.status] += 1
            if full or (not self.packing and len(step) == size):
                break
        self._check_drops()
        if not self.packing:
            return [parts[0] for parts in step]
        return [(parts[0][0], pack([ex for _, ex in parts], max_length)[0]) for parts in step]

    def _rank_micro_batches(self, step: list) -> list[list]:
        """This rank's micro-batches of a global step, cut as StepPlanSampler cuts them: every rank gets the
        same number; a final step with fewer examples than ranks is left out (as drop_last)."""
        if len(step) < self.world_size:
            if step:
                log.warning(
                    "stream end: %d example(s) left out, fewer than %d ranks", len(step), self.world_size
                )
            return []
        k = min(
            self.accumulate,
            -(-len(step) // (self.batch_size * self.world_size)),
            len(step) // self.world_size,
        )
        chunks = split_evenly(list(range(len(step))), self.world_size * k)
        return [[step[i] for i in chunks[j * self.world_size + self.rank]] for j in range(k)]

    def _update_counts(self) -> None:
        self.counts.clear()
        self.counts.update(split_counts(self._statuses, self._skipped, 0), chat_markers=self._with_markers)

    def _check_drops(self) -> None:
        c = split_counts(self._statuses, self._skipped, 0)
        lost = sum(c["skipped"].values()) + sum(c["dropped"].values())
        if c["rows"] >= 100 and lost / c["rows"] > self.max_drop_ratio:
            raise DataError(
                f"data.train: {lost} of the first {c['rows']} streamed rows were dropped or skipped "
                f"(dropped {c['dropped']}, skipped {c['skipped']}), more than "
                f"data.max_drop_ratio={self.max_drop_ratio}. Fix the data, raise data.max_length or use "
                "data.truncation=truncate, or raise data.max_drop_ratio."
            )

    def hold_out(self, n: int) -> tuple[list[Conversation], Counter]:
        """The first `n` rows as conversations (and the bad ones skipped, by reason), for the validation
        split; every pass of the stream then starts after them."""
        rows = Rows(self.sources, "train")
        taken = [row for _, row in itertools.islice(iter(rows), n)]
        if len(taken) < n:
            raise DataError(
                f"data.val_size={n}: the training data has only {len(taken)} rows, none left to train on. "
                "Lower data.val_size."
            )
        convs, skipped = convert_rows(taken, self.fmt, self.fields, self.on_error)
        self._start = rows.state()
        return convs, skipped

    def preview(self) -> SplitData:
        """The first examples of the stream in source order: a cheap stand-in for the whole split where one is
        asked for (resume's data fingerprint, sftlab-inspect), with the live counts of the stream."""
        skipped, with_markers = Counter(self._skipped), self._with_markers
        rows = Rows(self.sources, "train", self._start)
        convs = [c for _, c in itertools.islice(self._conversations(rows), PREVIEW)]
        self._skipped, self._with_markers = skipped, with_markers
        encoded = encode_conversations(convs, self.template, self.tokenizer, **self.encode_kwargs)
        kept = [(e, c) for e, c in zip(encoded, convs, strict=True) if not e.dropped]
        return SplitData([e for e, _ in kept], [c for _, c in kept], self.counts)


def check_stream_settings(dm: Any) -> None:
    """The datamodule's settings a stream cannot honour (config.streaming_problems, which also checks the
    trainer's and names the files when the config is composed), as one ConfigError."""
    settings = {
        "streaming": True,
        "shuffle_buffer": dm.shuffle_buffer,
        "val_fraction": dm.val_fraction,
        "val_size": dm.val_size,
        "val_path": dm.sources["val"] or None,
        "dedupe": dm.dedupe,
        "group_by_length": dm.group_by_length,
        "audit": dm.audit,
        "num_workers": dm.num_workers,
        "train_path": [{"weight": s.weight} for s in dm.sources["train"]],
    }
    problems = streaming_problems(settings, None)
    if problems:
        listing = "\n".join(f"  - {key}: {problem}" for key, problem in problems)
        raise ConfigError(f"data.streaming=true ({len(problems)} problem(s)):\n{listing}")


def stream_loader(dm: Any, trainer: Any) -> DataLoader:
    """The training loader over `dm.stream`: one item per micro-batch (already a batch, so no sampler and no
    batching by the loader), read in this process."""
    stream = dm.stream
    if trainer is not None:
        max_steps = trainer.max_steps
        if not (isinstance(max_steps, int) and max_steps >= 1):
            raise ConfigError(
                f"data.streaming=true needs trainer.max_steps (it is {max_steps!r}): a stream has no length."
            )
        stream.configure(
            accumulate=trainer.accumulate_grad_batches,
            world_size=trainer.world_size,
            rank=trainer.global_rank,
            epoch_of=lambda: trainer.current_epoch,
        )
    if stream._resume:  # set by load_state_dict when Lightning restores a checkpoint
        # Lightning warns that it cannot restore an iterable loader mid-epoch; the stream restores itself.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
    collate_fn = functools.partial(collate, pad_id=dm.tokenizer.pad_token_id)
    return DataLoader(stream, batch_size=None, num_workers=0, collate_fn=collate_fn)


def _features(index: int, ex: Encoded, step_targets: int) -> dict:
    item = {"input_ids": ex.input_ids, "labels": ex.labels, "step_targets": step_targets, "index": index}
    if ex.position_ids is not None:
        item["position_ids"] = ex.position_ids
    return item
