"""Examples to tensors: the map-style dataset the sampler indexes, and right-padding collation."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from sftlab.data.tokenize import IGNORE_INDEX, Encoded


class Examples(Dataset):
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
    "sequence"); the model then builds a block-diagonal mask from them (see packing.py). And the same
    boundaries explicitly (`boundaries`), for attention kinds that do not read position ids.
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
        batch.update(boundaries(position_ids))
    return batch


BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def boundaries(position_ids: torch.Tensor) -> dict:
    """The sequences of a packed batch as transformers' `DataCollatorWithFlattening` states them, over the
    batch's rows laid end to end: `cu_seq_lens_q/_k` (int32 starts plus the total), `max_length_q/_k` (a
    Python int) and `seq_idx` (int32, batch-shaped: which sequence each token belongs to).

    Flash-attention reads position ids as boundaries only for a single flattened row; with several packed
    rows per batch it needs these, or examples would attend to each other. Eager and SDPA ignore them."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    longest = int(cu.diff().max())
    seq_idx = (torch.cumsum((flat == 0).to(torch.int32), 0) - 1).to(torch.int32).view_as(position_ids)
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
        "seq_idx": seq_idx,
    }
