"""Experiment tracking: W&B offline-by-default when not logged in, and the run's final summary.

W&B is never allowed to block or break training: without credentials it runs offline (no network waits),
and `finish()` is always called (in `finally`) so a multirun never bleeds one job's run into the next.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger, WandbLogger

log = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def make_loggers(cfg: DictConfig | None) -> list[Logger]:
    if not cfg:
        return []
    if "wandb" in cfg and not os.environ.get("WANDB_MODE") and not wandb_logged_in():
        log.info("W&B: not logged in, logging offline (sync later with `wandb sync`).")
        os.environ["WANDB_MODE"] = "offline"
    return [instantiate(c) for c in cfg.values()]


def wandb_of(loggers: list[Logger]) -> WandbLogger | None:
    return next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)


def log_summary(loggers: list[Logger], summary: dict[str, Any]) -> None:
    wb = wandb_of(loggers)
    if wb is not None:
        wb.experiment.summary.update(summary)


def finish(loggers: list[Logger]) -> str | None:
    """Close the W&B run; return the `wandb sync` command when it was offline."""
    wb = wandb_of(loggers)
    if wb is None:
        return None
    import wandb

    run_dir = Path(wb.experiment.dir).parent if wb.experiment else None
    offline = os.environ.get("WANDB_MODE") == "offline"
    wandb.finish()
    return f"wandb sync {run_dir}" if offline and run_dir else None
