"""Deterministic batch sampler that plans whole optimizer steps.

SFT loss must be `sum of token losses / target tokens in the optimizer step`, across gradient-accumulation
micro-batches and data-parallel ranks. A micro-batch cannot know the other micro-batches of its step, so the
sampler plans the step up front: per epoch it permutes the examples (seed + epoch), cuts them into global
steps of `batch_size * accumulate * world_size` examples, and hands each rank its micro-batches together with
the step's *global* target-token count. No communication is needed and the plan is identical on every rank.

Micro-batch k of an epoch belongs to step k // accumulate, matching Lightning's accumulation boundaries
(`batch_idx % accumulate_grad_batches`). The sampler is resumable: `state_dict` records the epoch and how many
micro-batches were consumed, so a resumed run continues the same sample stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence


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
    ) -> None:
        self.num_targets = list(num_targets)
        self.batch_size, self.accumulate = batch_size, accumulate
        self.world_size, self.rank = world_size, rank
        self.shuffle, self.seed = shuffle, seed
        self.epoch = 0
        self.consumed = 0  # micro-batches of `epoch` already yielded (for resume)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def _order(self) -> list[int]:
        order = list(range(len(self.num_targets)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def plan(self) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches for the current epoch, each example tagged with its step's target count."""
        order = self._order()
        per_rank_step = self.batch_size * self.accumulate
        global_step = per_rank_step * self.world_size
        batches = []
        for start in range(0, len(order), global_step):
            step = order[start : start + global_step]
            total = sum(self.num_targets[i] for i in step)
            # Ranks take contiguous slices; a short final step still splits as evenly as it can.
            share = -(-len(step) // self.world_size)
            mine = step[self.rank * share : (self.rank + 1) * share]
            for b in range(0, len(mine), self.batch_size):
                batches.append([(i, total) for i in mine[b : b + self.batch_size]])
        return batches

    def __len__(self) -> int:
        return len(self.plan())

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        plan = self.plan()
        while self.consumed < len(plan):
            batch = plan[self.consumed]
            self.consumed += 1
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = state["epoch"], state["consumed"]
