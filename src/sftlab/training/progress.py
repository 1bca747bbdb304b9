"""A progress line in the log for runs nobody watches on a terminal (CI, nohup, `> log`, SLURM).

The progress bar redraws one terminal line; written to a pipe or a file it shows nothing until the end, so a
piped run is silent for minutes. `ProgressLog` logs a line through Python logging instead (so it also lands in
Hydra's train.log), every `every_n_steps` optimizer steps or every `every_s` seconds, and at the last step:

    step 40/100 (40%) | epoch 1/1 | train/loss 1.2345 | 295 tokens/s | elapsed 0:02:15 | ETA 0:03:23
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)


def _hms(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class ProgressLog(pl.Callback):
    """Logs step/total, epoch, the last step's train loss, tokens/s since the previous line, elapsed time and
    ETA. `when`: `not_a_terminal` (stdout is not a TTY: the bar is invisible there), `always` or `never`.
    tokens/s counts rank 0's input tokens (padding excluded) times the number of ranks."""

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_s: float | None = 30.0,
        when: Literal["not_a_terminal", "always", "never"] = "not_a_terminal",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if when not in ("not_a_terminal", "always", "never"):
            raise ValueError(f"ProgressLog when={when!r}: use not_a_terminal, always or never")
        self.every_n_steps, self.every_s, self.when, self.clock = every_n_steps, every_s, when, clock
        self.active = False

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.active = self.when == "always" or (self.when == "not_a_terminal" and not sys.stdout.isatty())
        self.started = self.last_time = self.clock()
        self.first_step = self.last_step = self.last_line_step = trainer.global_step  # resume starts later
        self.tokens = 0

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.active:
            return
        if isinstance(batch, dict) and "attention_mask" in batch:
            self.tokens += int(batch["attention_mask"].sum())
        step = trainer.global_step
        if step == self.last_step:
            return  # inside a gradient-accumulation window: no new optimizer step yet
        self.last_step, now = step, self.clock()
        total = trainer.estimated_stepping_batches
        due = (
            (self.every_n_steps and step - self.last_line_step >= self.every_n_steps)
            or (self.every_s is not None and now - self.last_time >= self.every_s)
            or step >= total
        )
        if due:
            log.info("%s", self.line(trainer, step, total, now))
            self.last_time, self.last_line_step, self.tokens = now, step, 0

    def line(self, trainer: pl.Trainer, step: int, total: float, now: float) -> str:
        elapsed = now - self.started
        parts = [
            f"step {step}/{total} ({100 * step / total:.0f}%)" if total != float("inf") else f"step {step}"
        ]
        max_epochs = trainer.max_epochs
        epoch = trainer.current_epoch + 1
        parts.append(f"epoch {epoch}/{max_epochs}" if max_epochs and max_epochs > 0 else f"epoch {epoch}")
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            parts.append(f"train/loss {float(loss):.4f}")
        seconds = now - self.last_time
        if seconds > 0:
            parts.append(f"{self.tokens * trainer.world_size / seconds:,.0f} tokens/s")
        parts.append(f"elapsed {_hms(elapsed)}")
        done = step - self.first_step
        if done > 0 and total != float("inf"):
            parts.append(f"ETA {_hms(elapsed / done * max(total - step, 0))}")
        return " | ".join(parts)
