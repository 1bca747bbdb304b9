"""Pure arithmetic over recorded steps: throughput medians, padding efficiency, ratios."""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.model.prefix import shared_context_length


@dataclass
class Step:
    """One optimizer step: non-pad tokens, target tokens, tokens computed (batch numel), attention work, time.

    On a shared CPU, other jobs stretch wall time but hardly the process's own CPU time, so both are kept:
    tokens per wall second is the figure the targets use, tokens per CPU second the check that a ratio is
    not an artefact of a neighbour's load changing between runners.
    """

    tokens: int
    targets: int
    computed: int
    pairs: int  # sum of n(n+1) over the step's examples of n tokens: the causal-attention work
    repeated: int = 0  # tokens of a prompt prefix the rows of a batch repeat, beyond its first copy
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of the process (all threads) in the step: robust to a loaded machine


@dataclass
class Record:
    """What a runner hands back: its steps (warm-up included) and everything else it measured."""

    name: str
    steps: list[Step] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Record:
        return cls(d["name"], [Step(**s) for s in d["steps"]], d.get("extra", {}))


def batch_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int, int, int, int]:
    """(non-pad tokens, target tokens, tokens computed, attention pairs, repeated prefix tokens) of a
    collated batch.

    Non-pad = the attention mask's ones; a padding-free batch (TRL `padding_free`, one flattened row with
    `position_ids` and no mask) has no padding, so every position counts. Targets exclude position 0 of each
    row, which nothing predicts (the loss shifts labels by one). The prompt prefix every row of a padded batch
    starts with (`prefix.shared_context_length`) needs computing once: its other copies are `repeated`, and
    their attention is left out of the pairs, whatever a framework computes.
    """
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else input_ids.numel()
    targets = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
    pairs = sum(n * (n + 1) for n in example_lengths(batch))
    shared = 0 if "position_ids" in batch else shared_context_length(input_ids, batch["labels"], mask)
    copies = input_ids.shape[0] - 1
    return tokens, targets, input_ids.numel(), pairs - copies * shared * (shared + 1), copies * shared


def example_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Lengths of the examples in a batch: per row from the attention mask, or per packed example from
    `position_ids` restarting at 0 (packed rows and padding-free batches)."""
    pos = batch.get("position_ids")
    if pos is not None and (batch.get("attention_mask") is None or bool((pos[:, 1:] == 0).any())):
        lengths: list[int] = []
        mask = batch.get("attention_mask")
        for row in range(pos.shape[0]):
            p = pos[row] if mask is None else pos[row][mask[row].bool()]
            starts = [*(p == 0).nonzero().flatten().tolist(), len(p)]
            lengths += [b - a for a, b in itertools.pairwise(starts) if b > a]
        return lengths
    mask = batch.get("attention_mask")
    if mask is None:
        return [batch["input_ids"].shape[-1]] * batch["input_ids"].shape[0]
    return [int(n) for n in mask.sum(-1)]


def steady(steps: Sequence[Step], warmup: int) -> list[Step]:
    """The steps after warm-up (at least one, so a too-short quick run still reports a figure)."""
    return list(steps[warmup:]) or list(steps[-1:])


def clock() -> tuple[float, float]:
    """(wall, process CPU) seconds."""
    return time.perf_counter(), time.process_time()


def elapsed(since: tuple[float, float]) -> tuple[tuple[float, float], dict[str, float]]:
    """(now, {"seconds": wall, "cpu_seconds": cpu} since `since`), for building a Step."""
    now = clock()
    return now, {"seconds": now[0] - since[0], "cpu_seconds": now[1] - since[1]}


def median_rate(steps: Sequence[Step], attr: str = "tokens", clock_attr: str = "seconds") -> float:
    """Median over steps of (count / seconds): robust to one step slowed down by a neighbour's job.
    `clock_attr="cpu_seconds"`: per CPU second instead of per wall second."""
    rates = [getattr(s, attr) / getattr(s, clock_attr) for s in steps if getattr(s, clock_attr) > 0]
    return statistics.median(rates) if rates else float("nan")


def padding_efficiency(steps: Sequence[Step]) -> float:
    """Non-pad tokens / tokens computed, over all given steps (1.0 = no padding at all)."""
    computed = sum(s.computed for s in steps)
    return sum(s.tokens for s in steps) / computed if computed else float("nan")


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b
