"""SFTDataModule: Lightning glue around the data pipeline (sources -> pipeline -> collate), the cache and the
step-plan sampler.

Everything that changes a token is in the pure modules (formats, templates, tokenize, packing, pipeline); this
class only does bookkeeping and batching. `counts()` reports per split what happened to every row (see
pipeline.py); train writes it to metrics.json and W&B.
"""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from sftlab.data import cache, pipeline
from sftlab.data.collate import Examples, collate
from sftlab.data.pipeline import (
    SplitData,
    Workers,
    default_num_proc,
    encode_split,
    first_occurrences,
    gc_paused,
    remove_converted,
    split_counts,
    split_indices,
    write_converted,
)
from sftlab.data.quality import special_strings
from sftlab.data.reasoning import POLICIES as REASONING_POLICIES
from sftlab.data.sampler import StepPlanSampler
from sftlab.data.sources import ON_ERROR, parse_sources, raw_chunks, source_fingerprint
from sftlab.data.streaming import TrainStream, check_stream_settings, stream_loader
from sftlab.data.tokenize import Template
from sftlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class SFTDataModule(pl.LightningDataModule):
    """Data settings (`conf/data/*.yaml`); see the module docstring and the README's data section.

    `on_error`: `raise` (default) stops at the first bad row with its file:line and the fix; `skip` skips and
    counts bad rows by reason. `max_drop_ratio`: the run stops when a split loses more than this fraction of
    its rows to drops (truncation policy, no targets) and skips; deliberate de-duplication does not count.
    `val_fraction`: without `val_path`, a seeded random fraction of the training rows is held out.
    `reasoning`: keep_last | keep_all | drop, which assistant turns keep their reasoning (data/reasoning.py).
    `packing`: several examples per row of `max_length` tokens (see packing.py). `cache_dir`: processed
    splits are cached there as memory-mapped Arrow datasets (null: they are written to a temporary directory
    removed at exit). `num_proc`: worker processes that convert and tokenize (null: the CPU count, at most 8;
    1: in this process). `audit`: read by sftlab-train, which audits the data
    first (`sftlab-data audit`) and refuses to train when a check holds (true: contamination>0; or a list).
    `streaming`: the training split is read, tokenized and (packed) while training runs, in the order of a
    seeded `shuffle_buffer` of rows (data/streaming.py); validation and test are processed as usual.
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
        reasoning: str = "keep_last",
        packing: bool = False,
        on_error: str = "raise",
        max_drop_ratio: float = 0.1,
        val_fraction: float = 0.0,
        dedupe: bool = False,
        cache_dir: str | None = None,
        shuffle: bool = True,
        group_by_length: bool = False,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 0,
        audit: bool | list[str] = False,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
        val_size: int = 0,
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
        self.encode_kwargs = {
            "max_length": max_length,
            "truncation": truncation,
            "train_on": train_on,
            "reasoning": reasoning,
        }
        self.packing, self.on_error, self.max_drop_ratio = packing, on_error, max_drop_ratio
        self.val_fraction, self.dedupe, self.cache_dir = val_fraction, dedupe, cache_dir
        self.shuffle, self.num_workers, self.seed = shuffle, num_workers, seed
        self.num_proc = default_num_proc() if num_proc is None else num_proc
        self.group_by_length, self.audit = group_by_length, audit
        self.streaming, self.shuffle_buffer, self.val_size = streaming, shuffle_buffer, val_size
        self._check_settings()
        self.splits: dict[str, SplitData] = {}
        self.sampler: StepPlanSampler | None = None
        self.stream: TrainStream | None = None
        if streaming:
            check_stream_settings(self)
            self.stream = TrainStream(
                self.sources.pop("train"),  # the map-style pipeline and its cache see val and test only
                template,
                tokenizer,
                fmt=format,
                fields=self.fields,
                on_error=on_error,
                encode_kwargs=self.encode_kwargs,
                packing=packing,
                batch_size=batch_size,
                shuffle=shuffle,
                shuffle_buffer=shuffle_buffer,
                seed=seed,
                max_drop_ratio=max_drop_ratio,
            )

    def _check_settings(self) -> None:
        if self.encode_kwargs["reasoning"] not in REASONING_POLICIES:
            raise ConfigError(
                f"data.reasoning={self.encode_kwargs['reasoning']!r}: use keep_last (reasoning of the final "
                "exchange only, as Qwen3-style templates render it), keep_all or drop."
            )
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"data.on_error={self.on_error!r}: use raise (stop at a bad row) or skip.")
        if self.packing and not self.encode_kwargs["max_length"]:
            raise ConfigError("data.packing=true needs data.max_length: it is the length of a packed row.")
        if not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise ConfigError(
                f"data.num_proc={self.num_proc!r}: use an integer >= 1, or null for the CPU count."
            )
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction}: use a fraction in [0, 1).")

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.stream is not None:
            if self.val_size:
                held_out, skipped = self.stream.hold_out(self.val_size)
                kwargs = {"skipped": skipped, "duplicates": 0, "packing": self.packing, **self.encode_kwargs}
                self.splits["val"] = encode_split(held_out, self.template, self.tokenizer, **kwargs)
                self._check_split("val", self.splits["val"])
            self.splits["train"] = self.stream.preview()
            if not any(self.sources.values()):
                return
        entry = self._cache_entry()
        loaded = cache.load(entry) if entry is not None else None
        if loaded is not None:
            log.info("data cache hit: %s (no reading, rendering or tokenizing)", entry)
        else:
            started = time.perf_counter()
            if entry is None:  # no cache: the same Arrow files, in a directory that lives as long as the run
                root = Path(tempfile.mkdtemp(prefix="sftlab-data-"))
                atexit.register(shutil.rmtree, root, ignore_errors=True)
                entry = root / "entry"
            build = cache.build_dir(entry.parent)
            try:
                with gc_paused():
                    counts = self._process(build)
            except BaseException:  # a bad row in strict mode, Ctrl-C: the half-written entry is ours
                shutil.rmtree(build, ignore_errors=True)
                raise
            cache.commit(build, entry, counts)
            loaded = cache.load(entry)
            if loaded is None:
                raise DataError(f"data: the processed splits written to {entry} cannot be read back.")
            log.info("data processed in %.2f s into %s", time.perf_counter() - started, entry)
        splits = {split: SplitData(**parts) for split, parts in loaded.items()}
        for split, data in splits.items():
            self._check_split(split, data)
        self.splits.update(splits)

    def _process(self, build: Path) -> dict[str, dict[str, Any]]:
        """Read and convert the rows, dedupe and split them, then encode each split chunk by chunk straight
        into its Arrow files under `build`; returns the counts per split.

        Memory holds chunks, never a split. A split that is neither deduplicated nor split in two is
        converted and encoded in one worker task per chunk of raw rows. Otherwise the workers convert raw
        chunks into conversations (JSON text), which wait in one Arrow file per split under `build`; dedupe
        compares 16-byte keys and the seeded validation split draws positions; then the workers read their
        chunk of conversations from that file by index and encode it. Either way the workers hand back
        Arrow tables the parent appends in chunk order."""
        job = {
            "convert": (self.format, self.fields, self.on_error, self.dedupe),
            "template": self.template,
            "tokenizer": self.tokenizer,
            "markers": special_strings(self.tokenizer),
            "kwargs": self.encode_kwargs,
        }
        split_train = self.val_fraction > 0 and bool(self.sources.get("train")) and not self.sources["val"]
        pack_length = self.encode_kwargs["max_length"] if self.packing else None
        counts: dict[str, dict[str, Any]] = {}

        def write(split: str, results: Iterable[tuple], skipped: Counter, duplicates: int) -> None:
            statuses, with_markers = Counter(), [0]
            tables = self._tables(results, statuses, with_markers, skipped)
            packed_rows = cache.write_split(build / split, tables, pack_length)
            counts[split] = split_counts(statuses, skipped, duplicates)
            counts[split]["chat_markers"] = with_markers[0]
            if packed_rows is not None:
                counts[split]["packed_rows"] = packed_rows

        with Workers(self.num_proc, scratch=build, **job) as workers:
            converted, skipped, keys, sizes = {}, {}, {}, {}
            for split, sources in self.sources.items():
                if not sources:
                    continue
                skipped[split] = Counter()
                if not self.dedupe and not (split == "train" and split_train):
                    write(split, workers.convert_encode(self._raw_chunks(split, sources)), skipped[split], 0)
                    continue
                converted[split] = build / f".converted-{split}.arrow"
                keys[split] = bytearray()
                results = workers.convert(self._raw_chunks(split, sources))
                collected = self._collect(results, skipped[split], keys[split])
                sizes[split] = write_converted(converted[split], collected)
            plan: dict[str, tuple[Path, Any]] = {}
            duplicates = dict.fromkeys(converted, 0)
            for split, path in converted.items():
                n = sizes[split]
                rows = first_occurrences(bytes(keys.pop(split))) if self.dedupe else np.arange(n)
                duplicates[split] = n - len(rows)
                plan[split] = (path, rows)
            if split_train:
                path, rows = plan["train"]
                train, val = split_indices(len(rows), self.val_fraction, self.seed)
                plan["train"], plan["val"] = (path, rows[train]), (path, rows[val])
                skipped["val"], duplicates["val"] = Counter(), 0
            for split, (path, rows) in plan.items():
                step = pipeline.CHUNK
                tasks = ((str(path), rows[i : i + step]) for i in range(0, len(rows), step))
                write(split, workers.encode(tasks), skipped[split], duplicates[split])
        for path in converted.values():
            remove_converted(path)
        return {split: counts[split] for split in ("train", "val", "test") if split in counts}

    def _raw_chunks(self, split: str, sources: list) -> Iterator[Any]:
        for k, src in enumerate(sources):
            yield from raw_chunks(src, f"data.{split}_path", split, pipeline.CHUNK, self.seed + k)

    @staticmethod
    def _collect(results: Iterable[tuple], skipped: Counter, keys: bytearray) -> Iterator[list[str]]:
        """The converted chunks' JSON texts, as they come; skips and dedupe keys are gathered on the way."""
        for bad, texts, digests in results:
            skipped.update(bad)
            keys += digests
            yield texts

    @staticmethod
    def _tables(
        results: Iterable[tuple], statuses: Counter, with_markers: list[int], skipped: Counter
    ) -> Iterator[tuple]:
        """The encoded chunks' Arrow tables, as they come; statuses and marker rows are counted on the way,
        and the skipped rows of chunks converted in the same task."""
        for result in results:
            if len(result) == 5:  # convert_encode_chunk: the skipped rows first
                skipped.update(result[0])
                result = result[1:]
            counted, examples, rows, markers = result
            statuses.update(counted)
            with_markers[0] += markers
            yield examples, rows

    def _cache_entry(self) -> Path | None:
        if not self.cache_dir:
            return None
        digests = Path(self.cache_dir) / ".digests"  # file digests by stat stamp (cache.file_digest)
        seeded = self.val_fraction > 0 or any(s.weight % 1 for srcs in self.sources.values() for s in srcs)
        parts = {
            "sources": {
                split: [source_fingerprint(s, f"data.{split}_path", digests) for s in srcs]
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

    def _step_plan(self, accumulate: int, world_size: int, rank: int) -> StepPlanSampler:
        return StepPlanSampler(
            self.splits["train"].num_targets,
            batch_size=self.batch_size,
            accumulate=accumulate,
            world_size=world_size,
            rank=rank,
            shuffle=self.shuffle,
            seed=self.seed,
            lengths=self.splits["train"].lengths if self.group_by_length else None,
        )

    def micro_batches_per_epoch(self, accumulate: int, world_size: int) -> int | None:
        """How many micro-batches one rank's training loader yields per epoch (None for a stream): what
        Lightning compares an integer `val_check_interval` with."""
        return None if self.stream is not None else len(self._step_plan(accumulate, world_size, rank=0))

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if self.stream is not None:
            return stream_loader(self, trainer)
        self.sampler = self._step_plan(
            accumulate=trainer.accumulate_grad_batches if trainer else 1,
            world_size=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
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
        return self._loader(
            Examples(self.splits["train"].examples), batch_sampler=self.sampler, generator=generator
        )

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
        epoch = fit_loop.epoch_progress.current.processed
        consumed = fit_loop.epoch_loop.batch_progress.current.processed
        if self.stream is not None:
            return {"stream": self.stream.state_dict(epoch, consumed)}
        return {"sampler": {"epoch": epoch, "consumed": consumed}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        kind, other = ("stream", "sampler") if self.stream is not None else ("sampler", "stream")
        if other in state_dict and kind not in state_dict:
            raise ConfigError(
                f"resume: the checkpoint was written with data.streaming={other == 'stream'}; a launch with "
                f"data.streaming={self.stream is not None} cannot continue its sample stream. Resume with "
                "the checkpoint's setting."
            )
        self._resume_state = state_dict.get(kind)
        if self.stream is not None:
            self.stream.load_state_dict(self._resume_state)

    def val_dataloader(self) -> DataLoader:
        return self._loader(Examples(self.splits["val"].examples), batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(Examples(self.splits["test"].examples), batch_size=self.eval_batch_size)
