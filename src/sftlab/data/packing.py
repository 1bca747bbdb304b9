"""Packing: several tokenized examples per row, each with its own position ids and no cross-attention.

`pack` puts examples into rows of at most `max_length` tokens by best-fit decreasing (sort by length, place
each example into the fullest row it still fits; O(n log n) with a sorted list of free capacities). Within a
row, position ids restart at 0 for every example. The model then sees `position_ids` and no 2-D attention mask
(`module.token_loss_sum`), from which transformers builds a block-diagonal causal mask on eager/SDPA
(`masking_utils.find_packed_sequence_indices`) and uses varlen kernels on flash-attention, so no example
attends to another. Every example's first label is already -100 (tokenize.assemble), so the first
token of an example is never a target of the previous example's last token. Per-example losses are therefore
the same as unpacked; a test checks it on the tiny model.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

from sftlab.data.tokenize import Encoded


def pack(examples: Sequence[Encoded], max_length: int) -> list[Encoded]:
    """Pack examples (each no longer than `max_length`) into rows; deterministic for a given input."""
    plan = pack_plan([len(ex.input_ids) for ex in examples], max_length)
    return [_concat([examples[i] for i in row]) for row in plan]


def pack_plan(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Which examples go into which row, from their lengths alone (so a large split can be packed without
    holding its examples in memory)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example of {n} tokens is longer than max_length={max_length}; truncate first")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            room, row = max_length - n, len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def _concat(parts: Sequence[Encoded]) -> Encoded:
    input_ids, labels, position_ids = [], [], []
    for ex in parts:
        input_ids += ex.input_ids
        labels += ex.labels
        position_ids += range(len(ex.input_ids))
    return Encoded(input_ids, labels, "kept", position_ids)


def length_grouped_order(
    lengths: Sequence[int], batch_size: int, seed: int, megabatch: int = 50
) -> list[int]:
    """The alternative to packing: an example order whose consecutive `batch_size` runs have similar lengths,
    so right-padding wastes little (as HF's LengthGroupedSampler). Shuffle with `seed`, cut into mega-batches
    of `batch_size * megabatch`, sort each by length (longest first). For a sampler's per-epoch order."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    size = batch_size * megabatch
    chunks = [sorted(order[i : i + size], key=lambda k: -lengths[k]) for i in range(0, len(order), size)]
    return [k for chunk in chunks for k in chunk]
