"""Callbacks that feed experiment tracking: sample generations as a W&B table, peak memory, CSV resume.

They come with the logger choice (conf/logger/*.yaml adds them to `callbacks`), so `logger=csv` runs carry no
W&B-only work. They act on rank zero only and never change training.
"""

from __future__ import annotations

import resource
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_only

from sftlab.data.formats import split_prompt
from sftlab.model.generate import generate
from sftlab.training.loggers import ResumableCSVLogger, wandb_of

SAMPLE_COLUMNS = ["step", "prompt", "reference", "output"]


class GenerationSamples(pl.Callback):
    """After each validation, greedy generations for the first `num_samples` validation conversations, logged
    as the W&B table `val/samples` (step, prompt, reference, output): watch the answers change as the loss
    falls. The same examples every time, so rows are comparable across steps and across sweep jobs.
    """

    def __init__(self, num_samples: int = 4, max_new_tokens: int = 32) -> None:
        self.num_samples, self.max_new_tokens = num_samples, max_new_tokens

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wb = wandb_of(trainer.loggers)
        dm = trainer.datamodule
        if wb is None or trainer.sanity_checking or self.num_samples <= 0 or "val" not in dm.splits:
            return
        if trainer.world_size > 1 and type(trainer.strategy) is not DDPStrategy:
            return  # FSDP / DeepSpeed shard the weights: rank 0 alone cannot run the model
        rows = sample_rows(pl_module.model, dm, self.num_samples, self.max_new_tokens, trainer.global_step)
        wb.log_table("val/samples", columns=SAMPLE_COLUMNS, data=rows, step=trainer.global_step)


def sample_rows(
    model: torch.nn.Module, datamodule: pl.LightningDataModule, n: int, max_new_tokens: int, step: int
) -> list[list]:
    """[step, prompt (last user turn), reference, output] for the first n validation conversations."""
    histories, references = zip(*(split_prompt(c) for c in datamodule.splits["val"].rows[:n]), strict=True)
    outs = generate(
        model,
        datamodule.tokenizer,
        datamodule.template,
        histories,
        max_new_tokens=max_new_tokens,
        batch_size=n,
    )
    return [
        [step, h[-1]["content"], r, o["text"]] for h, r, o in zip(histories, references, outs, strict=True)
    ]


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # ru_maxrss: bytes on macOS, KiB on Linux


class PeakMemory(pl.Callback):
    """Logs `perf/peak_memory_mb` with the training metrics (every `trainer.log_every_n_steps` steps).

    The peak only grows: each value is the peak so far, earlier validations and generations included.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            pl_module.log("perf/peak_memory_mb", peak_memory_mb(pl_module.device), rank_zero_only=True)


class CSVResume(pl.Callback):
    """Keeps csv/metrics.csv whole across `resume` (with `ResumableCSVLogger`): each checkpoint records how
    many rows the file had when it was written; when training starts the file is cut back to that many (the
    steps after it are replayed and log their rows again). A run that does not resume starts it empty."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}  # by the logger's name/version: the run directory may have moved

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            checkpoint["csv_rows"] = {_key(lg): lg.flushed_rows() for lg in _csv_loggers(trainer)}

    def on_load_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict) -> None:
        self.rows = dict(checkpoint.get("csv_rows") or {})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for lg in _csv_loggers(trainer):
                lg.keep_rows(self.rows.get(_key(lg), 0))


def _csv_loggers(trainer: pl.Trainer) -> list[ResumableCSVLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, ResumableCSVLogger)]


def _key(logger: ResumableCSVLogger) -> str:
    return f"{logger.name}/{logger.version}"
