"""The sweep-failure policy: in a multirun, one failing job is recorded and the others go on."""

from __future__ import annotations

import logging
import math
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

log = logging.getLogger(__name__)


def in_sweep() -> bool:
    """True inside a job of a Hydra multirun (`-m`, `hydra.mode=MULTIRUN`, Optuna search)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(run_dir: Path, err: BaseException) -> float:
    """A sweep job failed: log it, write `error.txt` in its directory, close a W&B run left open; return NaN.

    NaN lets the sweep go on: the basic sweeper ignores it and Optuna records the trial as failed.
    `sftlab-report` lists the job as failed with the last line of error.txt.
    """
    log.error("Job failed, the sweep goes on: %s: %s (%s)", type(err).__name__, err, run_dir / "error.txt")
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    (run_dir / "error.txt").write_text(text, encoding="utf-8")
    try:
        import wandb

        if wandb.run is not None:  # failed between creating the loggers and the `try` that finishes them
            wandb.finish(exit_code=1)
    except Exception as finish_err:  # reporting the first failure matters more
        log.warning("Could not close the W&B run: %s", finish_err)
    return math.nan
