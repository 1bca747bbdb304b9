"""SFTDataModule: read rows, convert to messages, render, tokenize, mask, batch.

Everything that changes a token is in the pure modules (formats, templates, tokenize); this class only does
I/O, bookkeeping (counts of kept / truncated / dropped examples, reported and never silent) and batching.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from sftlab import locate
from sftlab.data.formats import to_messages
from sftlab.data.sampler import StepPlanSampler
from sftlab.data.templates import ChatTemplate
from sftlab.data.tokenize import IGNORE_INDEX, Encoded, encode_conversations
from sftlab.errors import DataError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def read_jsonl(path: str, key: str) -> list[tuple[str, Any]]:
    """Rows of a JSONL file with their `file:line` location; blank lines are skipped."""
    file = Path(locate.resolve(path, key=key))
    if not file.is_file():
        raise DataError(f"{key}={path!r}: file not found. Point {key} at an existing .jsonl file.")
    rows = []
    with open(file, encoding="utf-8-sig") as f:  # utf-8-sig: tolerate a BOM on the first line
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno}). Fix or remove the line.") from None
    return rows


@dataclass
class SplitData:
    """The processed examples of one split plus what happened to every input row."""

    examples: list[Encoded]
    rows: list[list[dict]]  # the messages of each kept example, for generation-based evaluation
    counts: Counter

    @property
    def num_targets(self) -> list[int]:
        return [sum(label != IGNORE_INDEX for label in ex.labels[1:]) for ex in self.examples]


def process_split(rows: list[tuple[str, Any]], fmt: str | None, template: ChatTemplate,
                  tokenizer: PreTrainedTokenizerBase, **encode_kwargs: Any) -> SplitData:
    conversations = [to_messages(row, fmt, where) for where, row in rows]
    encoded = encode_conversations(conversations, template, tokenizer, **encode_kwargs)
    counts = Counter(e.status for e in encoded)
    kept = [(e, conv) for e, conv in zip(encoded, conversations, strict=True) if not e.dropped]
    return SplitData([e for e, _ in kept], [c for _, c in kept], counts)


class _Examples(Dataset):
    """Indexable by `(index, step_target_tokens)` pairs from StepPlanSampler, or plain ints (evaluation)."""

    def __init__(self, examples: list[Encoded]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, step_targets = key if isinstance(key, tuple) else (key, 0)
        ex = self.examples[index]
        return {"input_ids": ex.input_ids, "labels": ex.labels, "step_targets": step_targets, "index": index}


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad. Padding gets label -100 and attention 0, so it is never trained, even when pad == eos."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, :n] = torch.tensor(f["labels"])
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
        "step_targets": torch.tensor(features[0]["step_targets"]),
        "index": torch.tensor([f["index"] for f in features]),
    }


class SFTDataModule(pl.LightningDataModule):
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate,
        train_path: str,
        val_path: str | None = None,
        test_path: str | None = None,
        format: str | None = None,  # noqa: A002 - the user-facing key is `data.format`
        batch_size: int = 8,
        eval_batch_size: int = 16,
        max_length: int = 1024,
        truncation: str = "truncate",
        train_on: str = "all_assistant",
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer, self.template = tokenizer, template
        self.paths = {"train": train_path, "val": val_path, "test": test_path}
        self.format, self.batch_size, self.eval_batch_size = format, batch_size, eval_batch_size
        self.encode_kwargs = {"max_length": max_length, "truncation": truncation, "train_on": train_on}
        self.shuffle, self.num_workers, self.seed = shuffle, num_workers, seed
        self.splits: dict[str, SplitData] = {}
        self.sampler: StepPlanSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            if split in self.splits or not self.paths[split]:
                continue
            rows = read_jsonl(self.paths[split], key=f"data.{split}_path")
            self.splits[split] = process_split(rows, self.format, self.template, self.tokenizer, **self.encode_kwargs)
            data = self.splits[split]
            if not data.examples:
                raise DataError(f"data.{split}_path={self.paths[split]!r}: no usable example ({dict(data.counts)}).")
            log.info("data %s: %d examples kept; %s", split, len(data.examples), dict(data.counts))

    def counts(self) -> dict[str, dict[str, int]]:
        """Per split: rows read, kept, truncated and dropped by reason (reported in metrics.json and W&B)."""
        out = {}
        for split, data in self.splits.items():
            c = dict(data.counts)
            out[split] = {"rows": sum(c.values()), "kept": len(data.examples), **c}
        return out

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        collate_fn = functools.partial(collate, pad_id=self.tokenizer.pad_token_id)
        return DataLoader(dataset, num_workers=self.num_workers, collate_fn=collate_fn, **kwargs)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        self.sampler = StepPlanSampler(
            self.splits["train"].num_targets,
            batch_size=self.batch_size,
            accumulate=trainer.accumulate_grad_batches if trainer else 1,
            world_size=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=self.shuffle,
            seed=self.seed,
        )
        resume = getattr(self, "_resume_state", None)
        if resume:  # set by load_state_dict when Lightning restores a checkpoint
            self.sampler.resume_from(resume["epoch"], resume["consumed"])
        # Own generator: creating the loader iterator then draws nothing from the global torch RNG, so a
        # resumed run (which creates it mid-epoch) keeps the same dropout stream as an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(_Examples(self.splits["train"].examples), batch_sampler=self.sampler,
                            generator=generator)

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
        return {"sampler": {"epoch": fit_loop.epoch_progress.current.processed,
                            "consumed": fit_loop.epoch_loop.batch_progress.current.processed}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_state = state_dict.get("sampler")

    def val_dataloader(self) -> DataLoader:
        return self._loader(_Examples(self.splits["val"].examples), batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(_Examples(self.splits["test"].examples), batch_size=self.eval_batch_size)
