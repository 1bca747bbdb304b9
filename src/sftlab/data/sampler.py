"""Deterministic batch sampler that plans whole optimizer steps.

SFT loss must be `sum of token losses / target tokens in the optimizer step`, across gradient-accumulation
micro-batches and data-parallel ranks. A micro-batch cannot know the other micro-batches of its step, so the
sampler plans the step up front: per epoch it permutes the examples (seed + epoch), cuts them into global
steps of `batch_size * accumulate * world_size` examples, and hands each rank its micro-batches together with
the step's *global* target-token count. No communication is needed and the plan is identical on every rank.

Every rank gets the same number of micro-batches in every step (DDP would hang otherwise): a short final step
is cut into `world_size * k` micro-batches as evenly as possible. When the final step has fewer examples than
ranks, those few examples (at most `world_size - 1`, different ones each epoch when shuffling) are left out of
that epoch and reported in the log, as `drop_last` would do, instead of padding with repeated examples.

`lengths` (data.group_by_length): the per-epoch permutation is length-grouped (`packing.length_grouped_order`,
as HF's group_by_length): seeded mega-batches of 50 micro-batches, each sorted longest first, so a micro-batch
holds examples of similar length and right-padding wastes little, without packing. The step plan and its
target counts are built on that order exactly as on a plain shuffle.

Micro-batch k of an epoch belongs to step k // accumulate, matching Lightning's accumulation boundaries
(`batch_idx % accumulate_grad_batches`, and the last batch of the epoch closes the step).

Resume: Lightning restarts a mid-epoch run by iterating the dataloader again. `resume_from(epoch, consumed)`
makes the next iteration over `epoch` skip the `consumed` micro-batches the checkpoint had already trained on;
the datamodule takes `consumed` from Lightning's loop progress (a counter kept here would be off by the batch
Lightning fetches ahead).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence

from sftlab.data.packing import length_grouped_order

log = logging.getLogger(__name__)


def split_evenly(items: list[int], parts: int) -> list[list[int]]:
    """`parts` contiguous slices whose sizes differ by at most one (larger ones first)."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (p < extra)
        out.append(items[start : start + size])
        start += size
    return out


class _EpochHook:
    def __init__(self, owner: StepPlanSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class StepPlanSampler:
    """Yields lists of `(example_index, step_target_tokens)` for this rank."""

    def __init__(
        self,
        num_targets: Sequence[int],
        batch_size: int,
        accumulate: int = 1,
        world_size: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
    ) -> None:
        self.num_targets = list(num_targets)
        self.lengths = None if lengths is None else list(lengths)
        self.batch_size, self.accumulate = batch_size, accumulate
        self.world_size, self.rank = world_size, rank
        self.shuffle, self.seed = shuffle, seed
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, micro-batches to skip) for the next iteration

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch, through `sampler` below."""
        self.epoch = epoch

    @property
    def sampler(self) -> _EpochHook:
        """Lightning's `_set_sampler_epoch` calls `set_epoch` on `dataloader.sampler` and on
        `dataloader.batch_sampler.sampler`, never on the batch sampler itself; without this hook every epoch
        would replay epoch 0's order (found by the lead: a 2-epoch run reshuffled nothing)."""
        return _EpochHook(self)

    def resume_from(self, epoch: int, consumed: int) -> None:
        self._resume = (epoch, consumed)

    def _order(self) -> list[int]:
        if self.shuffle and self.lengths is not None:
            return length_grouped_order(self.lengths, self.batch_size, self.seed + self.epoch)
        order = list(range(len(self.num_targets)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def _global_steps(self) -> tuple[list[list[int]], list[int]]:
        """The epoch's global steps, and the examples left out because there are fewer than ranks."""
        order = self._order()
        size = self.batch_size * self.accumulate * self.world_size
        steps = [order[s : s + size] for s in range(0, len(order), size)]
        if steps and len(steps[-1]) < self.world_size:
            return steps[:-1], steps[-1]
        return steps, []

    def _rank_micro_batches(self, step: list[int]) -> list[list[int]]:
        """This rank's micro-batches of one global step; every rank gets the same number of them."""
        k = min(self.accumulate, -(-len(step) // (self.batch_size * self.world_size)))
        k = min(k, len(step) // self.world_size)  # each of the world_size * k micro-batches non-empty
        chunks = split_evenly(step, self.world_size * k)
        # Micro-batch j of rank r is chunk j * world_size + r, so ranks hold near-equal token work.
        return [chunks[j * self.world_size + self.rank] for j in range(k)]

    def plan(self) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches of this epoch, each example tagged with its step's target count."""
        steps, _ = self._global_steps()
        batches = []
        for step in steps:
            total = sum(self.num_targets[i] for i in step)
            batches.extend([(i, total) for i in mb] for mb in self._rank_micro_batches(step))
        return batches

    def __len__(self) -> int:
        return len(self.plan())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        left_out = self._global_steps()[1]
        if left_out and self.rank == 0:
            log.warning(
                "epoch %d: %d example(s) left out: the last step has fewer examples than %d ranks",
                self.epoch,
                len(left_out),
                self.world_size,
            )
        skip = 0
        if self._resume is not None:
            epoch, consumed = self._resume
            skip = consumed if epoch == self.epoch else 0
            self._resume = None
        yield from self.plan()[skip:]
