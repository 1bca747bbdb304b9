"""Learning-rate schedules with warmup, as pure LambdaLR factories (`conf/scheduler/*.yaml`, `_partial_`).

`warmup` below 1 is a fraction of the total optimizer steps, otherwise a number of steps. The total comes from
Lightning's `estimated_stepping_batches`, so the schedule spans exactly the run (epochs, accumulation and
`max_steps` included).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

KINDS = ("cosine", "linear", "constant")


def warmup_steps(warmup: float, total_steps: int) -> int:
    return round(warmup * total_steps) if warmup < 1 else int(warmup)


def lr_factor(step: int, *, kind: str, warmup: int, total: int, min_lr_ratio: float) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * decay


def warmup_schedule(
    optimizer: Optimizer,
    total_steps: int,
    kind: str = "cosine",
    warmup: float = 0.05,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    n_warmup = warmup_steps(warmup, total_steps)
    return LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, kind=kind, warmup=n_warmup, total=total_steps, min_lr_ratio=min_lr_ratio
        ),
    )
