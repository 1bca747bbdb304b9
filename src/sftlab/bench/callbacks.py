"""Lightning callbacks the benchmark adds to sftlab's real Trainer (and to `python train.py`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from sftlab.bench.hardware import synchronize
from sftlab.bench.stats import Step, batch_counts, clock, elapsed


class StepTimer(pl.Callback):
    """Wall time and token counts of every optimizer step.

    A step's time runs from the end of the previous step to the end of this one, so it includes everything
    the framework does per step (fetching and collating the batch, hooks, logging, the optimizer), not just
    forward and backward.
    """

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self._last = clock()
        self._pending = [0, 0, 0, 0, 0]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = clock()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        counts = batch_counts(batch)
        self._pending = [a + b for a, b in zip(self._pending, counts, strict=True)]
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        synchronize(pl_module.device)
        now, times = elapsed(self._last)
        self.steps.append(Step(*self._pending, **times))
        self._last, self._pending = now, [0, 0, 0, 0, 0]


class FirstStepMarker(pl.Callback):
    """Writes the wall-clock time (`time.time()`) of the end of the first optimizer step to `path`.

    `sftlab-bench` adds it to `python train.py` (`+callbacks.bench_first_step=...`) to measure the time from
    launch to the first step through the real entry point.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step >= 1 and not Path(self.path).exists():
            Path(self.path).write_text(f"{time.time()}\n")


def train_command(overrides: list[str], run_dir: Path, name: str, callback: type, **kwargs: Any) -> list[str]:
    """`python -m sftlab.cli.train` as the benchmark launches it: the overrides, then `eval=none` (the judge
    or nothing evaluates afterwards; the base evaluation is not the cost measured) and `logger=csv` (no W&B
    service left behind by a run stopped early), into `run_dir`, with `callback` added as `callbacks.<name>`
    (its keyword arguments as its config)."""
    target = f"+callbacks.{name}"
    return [
        sys.executable,
        "-m",
        "sftlab.cli.train",
        *overrides,
        "eval=none",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        f"{target}._target_={callback.__module__}.{callback.__qualname__}",
        *(f"{target}.{k}={v}" for k, v in kwargs.items()),
    ]
