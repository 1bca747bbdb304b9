"""SFTDataModule: read rows, convert to messages, render, tokenize, mask, (pack), cache, batch.

Everything that changes a token is in the pure modules (formats, templates, tokenize, packing); this class
only does I/O, bookkeeping and batching. Nothing is dropped silently: per split, `counts()` reports rows read,
kept, truncated, dropped by reason (too_long, no_targets, no_targets_after_truncation, duplicate) and skipped
by reason (bad rows in `on_error=skip` mode), with rows == kept + dropped + skipped; train.py writes it to
metrics.json and W&B.

Sources (`data.train_path` / `val_path` / `test_path`): a local .jsonl / .json / .csv / .parquet file
(`pkg://` works), a Hugging Face Hub dataset id (loaded with `datasets.load_dataset`, split `train`,
`validation` or `test`), or a list of sources mixed with weights: `[{path: a.jsonl, weight: 2}, {path: b.csv,
weight: 0.5}]` repeats every row of a twice and a seeded half of b's rows. JSONL and CSV are read with the
standard library so every row keeps its `file:line` and no value is type-coerced (CSV cells are strings).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gc
import json
import logging
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from sftlab import locate
from sftlab.data import cache
from sftlab.data.formats import BadRow, Conversation, to_messages
from sftlab.data.packing import pack
from sftlab.data.sampler import StepPlanSampler
from sftlab.data.tokenize import IGNORE_INDEX, Encoded, Template, encode_conversations
from sftlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ON_ERROR = ("raise", "skip")
Row = tuple[str, Any]  # (location "file:line", the parsed row or a BadRow for an unparsable line)


@dataclass(frozen=True)
class Source:
    path: str
    weight: float = 1.0
    split: str | None = None  # hub split name (default: train / validation / test)
    revision: str | None = None  # hub revision, part of the cache key


def parse_sources(value: Any, key: str) -> list[Source]:
    """`data.<split>_path`: null, one path / hub id, or a list of paths or {path, weight, split, revision}."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    sources = []
    for item in items:
        spec = {"path": item} if isinstance(item, str) else item
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
            raise ConfigError(f"{key}={value!r}: each source is a path string or {{path, weight, split}}.")
        unknown = set(spec) - {"path", "weight", "split", "revision"}
        weight = spec.get("weight", 1.0)
        if unknown or not isinstance(weight, int | float) or weight <= 0:
            raise ConfigError(f"{key}: bad source {spec!r}: keys are path, weight (> 0), split, revision.")
        sources.append(Source(spec["path"], float(weight), spec.get("split"), spec.get("revision")))
    return sources


def _local_file(path: str, key: str) -> Path | None:
    """The local file a source names, None for a hub dataset id; a missing local file is an error."""
    file = Path(locate.resolve(path, key=key))
    if file.is_file():
        return file
    if path.startswith((locate.PKG_SCHEME, "/", ".", "~")) or path.endswith(FILE_SUFFIXES):
        raise DataError(
            f"{key}={path!r}: file not found. Point {key} at an existing "
            f"{'/'.join(FILE_SUFFIXES)} file or a Hugging Face dataset id."
        )
    return None


def read_jsonl(path: str, key: str) -> list[Row]:
    """Rows of a JSONL file (`pkg://` works) with `file:line`, raising DataError at the first unparsable line.
    For callers outside the training pipeline (e.g. eval prompt files)."""
    file = _local_file(path, key)
    if file is None:
        raise DataError(f"{key}={path!r}: file not found. Point {key} at an existing .jsonl file.")
    rows = jsonl_rows(file)
    bad = next((row for _, row in rows if isinstance(row, BadRow)), None)
    if bad is not None:
        raise bad
    return rows


def jsonl_rows(file: Path) -> list[Row]:
    """Rows of a JSONL file with `file:line`; blank lines are skipped; BOM and CRLF are accepted; an
    unparsable line becomes a BadRow in place, so lenient mode can count it."""
    rows: list[Row] = []
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{file}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                rows.append((where, BadRow(where, "invalid_unicode", "the line is not UTF-8. Re-encode it.")))
                continue
            if not line.strip():
                continue
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                reason = f"invalid JSON ({err.msg} at column {err.colno}). Fix or remove the line."
                rows.append((where, BadRow(where, "bad_json", reason)))
    return rows


def read_json(file: Path) -> list[Row]:
    """A JSON array of rows (`file[i]`); a .json file that is really JSON Lines is read as such."""
    text = file.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            return jsonl_rows(file)
        raise DataError(f"{file}:{err.lineno}: invalid JSON ({err.msg}). Fix the file.") from None
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON array of rows or JSON Lines, not a {type(data).__name__}.")
    return [(f"{file}[{i}]", row) for i, row in enumerate(data)]


def read_csv(file: Path) -> list[Row]:
    """CSV with a header row; every cell stays a string (no type guessing); `file:line` of each record."""
    rows: list[Row] = []
    with open(file, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        start = 2
        for row in reader:
            if any(v for v in row.values() if isinstance(v, str) and v.strip()):
                rows.append((f"{file}:{start}", row))
            start = reader.line_num + 1
    return rows


def read_with_datasets(source: Source, file: Path | None, split: str, key: str) -> list[Row]:
    """Parquet files and hub datasets, through `datasets` (imported only here: it is slow to import)."""
    import datasets

    try:
        if file is not None:
            ds = datasets.load_dataset("parquet", data_files=str(file), split="train")
        else:
            ds = datasets.load_dataset(source.path, split=source.split or split, revision=source.revision)
    except Exception as err:  # datasets raises many types; the message says what to do
        raise DataError(
            f"{key}={source.path!r}: cannot load it with datasets ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). For a hub id, check the name and split and "
            "that the hub is reachable (or cached); otherwise point the key at a local file."
        ) from None
    name = str(file) if file is not None else f"{source.path}[{source.split or split}]"
    return [(f"{name} row {i}", row) for i, row in enumerate(ds.to_list())]


def read_source(source: Source, key: str, split: str) -> list[Row]:
    file = _local_file(source.path, key)
    if file is None or file.suffix == ".parquet":
        return read_with_datasets(source, file, HUB_SPLITS[split], key)
    readers = {".jsonl": jsonl_rows, ".json": read_json, ".csv": read_csv}
    if file.suffix not in readers:
        raise DataError(f"{key}={source.path!r}: unknown file type; use {', '.join(FILE_SUFFIXES)}.")
    return readers[file.suffix](file)


def weigh(rows: list[Row], weight: float, seed: int) -> list[Row]:
    """Mixture weight: every row `int(weight)` times plus a seeded sample of the fractional part."""
    whole, frac = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(rows, round(frac * len(rows))) if frac else []
    return rows * whole + extra


def source_fingerprint(source: Source, key: str) -> dict:
    file = _local_file(source.path, key)
    ident = cache.file_digest(file) if file is not None else f"hub:{source.path}@{source.revision}"
    return {"data": ident, "weight": source.weight, "split": source.split}


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


class _Examples(Dataset):
    """Indexable by `(index, step_target_tokens)` pairs from StepPlanSampler, or plain ints (evaluation)."""

    def __init__(self, examples: list[Encoded]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, step_targets = key if isinstance(key, tuple) else (key, 0)
        ex = self.examples[index]
        item = {"input_ids": ex.input_ids, "labels": ex.labels, "step_targets": step_targets, "index": index}
        if ex.position_ids is not None:
            item["position_ids"] = ex.position_ids
        return item


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad. Padding gets label -100 and attention 0, so it is never trained, even when pad == eos.

    Packed rows also carry `position_ids` (restarting per example; padding gets 0, its own one-token
    "sequence"); the model then builds a block-diagonal mask from them (see packing.py).
    """
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, :n] = torch.tensor(f["labels"])
        attention_mask[row, :n] = 1
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "step_targets": torch.tensor(features[0]["step_targets"]),
        "index": torch.tensor([f["index"] for f in features]),
    }
    if "position_ids" in features[0]:
        position_ids = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            position_ids[row, : len(f["position_ids"])] = torch.tensor(f["position_ids"])
        batch["position_ids"] = position_ids
    return batch


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
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


class SFTDataModule(pl.LightningDataModule):
    """Data settings (`conf/data/*.yaml`); see the module docstring and the README's data section.

    `on_error`: `raise` (default) stops at the first bad row with its file:line and the fix; `skip` skips and
    counts bad rows by reason. `max_drop_ratio`: the run stops when a split loses more than this fraction of
    its rows to drops (truncation policy, no targets) and skips; deliberate de-duplication does not count.
    `val_fraction`: without `val_path`, a seeded random fraction of the training rows is held out.
    `packing`: several examples per row of `max_length` tokens (see packing.py). `cache_dir`: processed
    splits are cached there (null disables caching).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: Template,
        train_path: str | list | None,
        val_path: str | list | None = None,
        test_path: str | list | None = None,
        format: str | None = None,
        fields: dict | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        max_length: int | None = 1024,
        truncation: str = "truncate",
        train_on: str = "all_assistant",
        packing: bool = False,
        on_error: str = "raise",
        max_drop_ratio: float = 0.1,
        val_fraction: float = 0.0,
        dedupe: bool = False,
        cache_dir: str | None = None,
        shuffle: bool = True,
        group_by_length: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer, self.template = tokenizer, template
        paths = {"train": train_path, "val": val_path, "test": test_path}
        self.sources = {s: parse_sources(p, f"data.{s}_path") for s, p in paths.items()}
        if not self.sources["train"]:
            raise ConfigError("data.train_path is not set: point it at a data file or a hub dataset id.")
        if isinstance(fields, DictConfig):
            fields = OmegaConf.to_container(fields, resolve=True)
        self.format, self.fields = format, dict(fields or {})
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.encode_kwargs = {"max_length": max_length, "truncation": truncation, "train_on": train_on}
        self.packing, self.on_error, self.max_drop_ratio = packing, on_error, max_drop_ratio
        self.val_fraction, self.dedupe, self.cache_dir = val_fraction, dedupe, cache_dir
        self.shuffle, self.num_workers, self.seed = shuffle, num_workers, seed
        self.group_by_length = group_by_length
        self._check_settings()
        self.splits: dict[str, SplitData] = {}
        self.sampler: StepPlanSampler | None = None

    def _check_settings(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"data.on_error={self.on_error!r}: use raise (stop at a bad row) or skip.")
        if self.packing and not self.encode_kwargs["max_length"]:
            raise ConfigError("data.packing=true needs data.max_length: it is the length of a packed row.")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction}: use a fraction in [0, 1).")

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        entry = self._cache_entry()
        with _gc_paused():
            loaded = cache.load(entry) if entry is not None else None
        if loaded is not None:
            self.splits = {split: SplitData(**parts) for split, parts in loaded.items()}
            log.info("data cache hit: %s (no reading, rendering or tokenizing)", entry)
        else:
            started = time.perf_counter()
            with _gc_paused():
                self.splits = self._process()
            log.info("data processed in %.2f s", time.perf_counter() - started)
            if entry is not None:
                cache.save(entry, self.splits)
                log.info("data cached at %s", entry)
        for split, data in self.splits.items():
            self._check_split(split, data)

    def _process(self) -> dict[str, SplitData]:
        conversations: dict[str, list[Conversation]] = {}
        skipped: dict[str, Counter] = {}
        for split, sources in self.sources.items():
            if not sources:
                continue
            rows: list[Row] = []
            for k, src in enumerate(sources):
                rows += weigh(read_source(src, f"data.{split}_path", split), src.weight, self.seed + k)
            conversations[split], skipped[split] = convert_rows(rows, self.format, self.fields, self.on_error)
        duplicates = dict.fromkeys(conversations, 0)
        if self.dedupe:
            for split in conversations:
                conversations[split], duplicates[split] = dedupe(conversations[split])
        if "val" not in conversations and self.val_fraction > 0:
            train, val = split_off(conversations["train"], self.val_fraction, self.seed)
            conversations["train"], conversations["val"] = train, val
            skipped["val"], duplicates["val"] = Counter(), 0
        return {
            split: encode_split(
                convs,
                self.template,
                self.tokenizer,
                skipped=skipped[split],
                duplicates=duplicates[split],
                packing=self.packing,
                **self.encode_kwargs,
            )
            for split, convs in conversations.items()
        }

    def _cache_entry(self) -> Path | None:
        if not self.cache_dir:
            return None
        seeded = self.val_fraction > 0 or any(s.weight % 1 for srcs in self.sources.values() for s in srcs)
        parts = {
            "sources": {
                split: [source_fingerprint(s, f"data.{split}_path") for s in srcs]
                for split, srcs in self.sources.items()
            },
            "settings": {
                "format": self.format,
                "fields": self.fields,
                "on_error": self.on_error,
                "dedupe": self.dedupe,
                "val_fraction": self.val_fraction,
                "packing": self.packing,
                "seed": self.seed if seeded else None,
                **self.encode_kwargs,
            },
            "template": cache.template_fingerprint(self.template),
            "tokenizer": cache.tokenizer_fingerprint(self.tokenizer),
        }
        return Path(self.cache_dir) / cache.cache_key(parts)

    def _check_split(self, split: str, data: SplitData) -> None:
        c = data.counts
        log.info(
            "data %s: %d rows -> %d kept (%d truncated); dropped %s; skipped %s%s",
            split,
            c["rows"],
            c["kept"],
            c["truncated"],
            c["dropped"] or "none",
            c["skipped"] or "none",
            f"; packed into {c['packed_rows']} rows" if "packed_rows" in c else "",
        )
        if not data.examples:
            raise DataError(
                f"data.{split}: no usable example ({c}). Check data.format, data.fields and data.max_length."
            )
        lost = sum(c["skipped"].values()) + sum(n for r, n in c["dropped"].items() if r != "duplicate")
        if c["rows"] and lost / c["rows"] > self.max_drop_ratio:
            raise DataError(
                f"data.{split}: {lost} of {c['rows']} rows were dropped or skipped (dropped {c['dropped']}, "
                f"skipped {c['skipped']}), more than data.max_drop_ratio={self.max_drop_ratio}. Fix the "
                "data, raise data.max_length or use data.truncation=truncate, or raise data.max_drop_ratio."
            )

    def counts(self) -> dict[str, dict[str, Any]]:
        """Per split: rows, kept, truncated, dropped {reason: n}, skipped {reason: n} (metrics.json, W&B);
        rows == kept + sum(dropped) + sum(skipped)."""
        return {split: dict(data.counts) for split, data in self.splits.items()}

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        collate_fn = functools.partial(collate, pad_id=self.tokenizer.pad_token_id)
        return DataLoader(dataset, num_workers=self.num_workers, collate_fn=collate_fn, **kwargs)

    def train_dataloader(self) -> DataLoader:
        trainer, examples = self.trainer, self.splits["train"].examples
        self.sampler = StepPlanSampler(
            self.splits["train"].num_targets,
            batch_size=self.batch_size,
            accumulate=trainer.accumulate_grad_batches if trainer else 1,
            world_size=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=self.shuffle,
            seed=self.seed,
            lengths=[len(ex.input_ids) for ex in examples] if self.group_by_length else None,
        )
        resume = getattr(self, "_resume_state", None)
        if resume:  # set by load_state_dict when Lightning restores a checkpoint
            self.sampler.resume_from(resume["epoch"], resume["consumed"])
            # Lightning warns that resuming mid-epoch with a loader it cannot restore is unreliable; this
            # sampler skips exactly the micro-batches the checkpoint trained, so the warning does not apply.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
        # Own generator: creating the loader iterator then draws nothing from the global torch RNG, so a
        # resumed run (which creates it mid-epoch) keeps the same dropout stream as an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(_Examples(examples), batch_sampler=self.sampler, generator=generator)

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: where the train sample stream stands, for an exact mid-epoch resume.

        Taken from Lightning's loop progress, not from the sampler: Lightning fetches one batch ahead, so the
        sampler has always yielded one micro-batch more than was trained. `processed` counts the micro-batches
        trained in this epoch whether the save happens at batch end or after validation.
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        fit_loop = trainer.fit_loop
        return {
            "sampler": {
                "epoch": fit_loop.epoch_progress.current.processed,
                "consumed": fit_loop.epoch_loop.batch_progress.current.processed,
            }
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_state = state_dict.get("sampler")

    def val_dataloader(self) -> DataLoader:
        return self._loader(_Examples(self.splits["val"].examples), batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(_Examples(self.splits["test"].examples), batch_size=self.eval_batch_size)
