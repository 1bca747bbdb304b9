"""Experiment tracking: W&B offline-by-default when not logged in, one W&B run per job, and the run's summary.

W&B is never allowed to block or break training: without credentials it runs offline (no network waits),
and `finish()` is always called (in `finally`) so a multirun never bleeds one job's run into the next.

In a sweep every job is its own W&B run: the group is the sweep directory (all jobs of one
`python train.py -m ...` together), the name is the job's overrides (`adapter.r=8,optimizer.lr=0.0001`) and
the tags are the config's `tags` plus each override. Values set explicitly in `logger.wandb.*` win.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from sftlab.rundir.redact import redact

log = logging.getLogger(__name__)
MAX_TAG_LEN = 64  # W&B rejects longer tags


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def job_identity(tags: list[str] | None = None) -> dict[str, Any]:
    """W&B group / name / tags of the current Hydra job; empty outside a Hydra app (tests calling run()).

    The name is Hydra's `override_dirname` (sorted `key=value` joined by commas). Secrets in overrides are
    masked as everywhere else: a credential-named key (`eval.judge.api_key=...`) and the value of a credential
    environment variable, which Hydra interpolates into override strings (`x=${oc.env:OPENAI_API_KEY}`).
    """
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    overrides = [_masked(o) for o in hc.overrides.task]
    identity: dict[str, Any] = {
        "name": ",".join(sorted(overrides)) or None,
        "tags": list(dict.fromkeys([*(tags or []), *(o[:MAX_TAG_LEN] for o in overrides)])),
    }
    if hc.mode == RunMode.MULTIRUN:
        identity["group"] = str(hc.sweep.dir)
    return identity


def _masked(override: str) -> str:
    key, sep, value = override.partition("=")
    return key + sep + redact({key.rsplit(".", 1)[-1].lstrip("+~"): value}).popitem()[1]


def make_loggers(cfg: DictConfig | None) -> list[Logger]:
    chosen = {name: c for name, c in (cfg or {}).items() if c is not None}  # `logger.<name>=null`: off
    if "wandb" in chosen and not os.environ.get("WANDB_MODE") and not wandb_logged_in():
        log.info("W&B: not logged in, logging offline (sync later with `wandb sync`).")
        os.environ["WANDB_MODE"] = "offline"
    return [instantiate(_with_identity(c) if name == "wandb" else c) for name, c in chosen.items()]


def _with_identity(wandb_cfg: DictConfig) -> DictConfig:
    """Fill the W&B name / group / tags the user left unset (null) from the job's identity."""
    out = OmegaConf.create(OmegaConf.to_container(wandb_cfg, resolve=True))
    identity = job_identity(list(out.get("tags") or []))
    for key, value in identity.items():
        if key == "tags" or out.get(key) is None:
            out[key] = value
    return out


class SafeWandbLogger(WandbLogger):
    """WandbLogger whose logging can fail without failing training (issue: logging never breaks a run).

    A W&B error while logging (the wandb service died, the run was closed, a full disk under wandb/) is
    reported once per kind of call and training goes on; the CSV logger beside it keeps every metric.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Lightning passes anonymous=None to wandb.init, and wandb warns that this setting does nothing.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        self.failed: set[str] = set()  # the kinds of call that have failed (each reported once)

    def guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as err:  # any W&B failure must stay a logging failure
            if what not in self.failed:
                log.error(
                    "W&B error in %s, training continues (CSV metrics are complete): %s: %s",
                    what,
                    type(err).__name__,
                    err,
                )
            self.failed.add(what)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.guard("log_metrics", super().log_metrics, metrics, step)

    def log_hyperparams(self, params: Any) -> None:
        self.guard("log_hyperparams", super().log_hyperparams, params)

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self.guard("log_table", super().log_table, *args, **kwargs)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.guard("after_save_checkpoint", super().after_save_checkpoint, checkpoint_callback)


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; this one keeps it (and its
    header, so later rows line up) for `ResumableCSVLogger` to cut back."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose csv/metrics.csv survives `resume`.

    Lightning's CSVLogger deletes metrics.csv whenever it starts in a directory that has one, so a resumed run
    kept only the rows logged after the restart (and `sftlab-report` drew half a curve). Here the file stays:
    `sftlab.training.callbacks.CSVResume` stores in every checkpoint how many rows the file had, and when
    training starts it cuts the file back to that count (the replayed steps log the rest again), or to zero
    for a fresh run in an old directory, which is what Lightning's logger gives.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    def flushed_rows(self) -> int:
        """Write out the buffered rows; the number of rows metrics.csv then holds."""
        self.save()
        return len(self._read()[1])

    def keep_rows(self, n: int) -> None:
        """Cut metrics.csv back to its first `n` rows (rows still buffered are not touched)."""
        header, rows = self._read()
        if len(rows) <= n:
            return
        with self._fs.open(self.experiment.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows[:n])

    def _read(self) -> tuple[list[str], list[dict]]:
        path = self.experiment.metrics_file_path
        if not self._fs.isfile(path):
            return [], []
        with self._fs.open(path, "r", newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)


def _guarded(wb: WandbLogger, what: str, fn: Any) -> None:
    """Run a W&B call through SafeWandbLogger's guard (a plain WandbLogger, if configured, may raise)."""
    if isinstance(wb, SafeWandbLogger):
        wb.guard(what, fn)
    else:
        fn()


def log_eval_tables(loggers: list[Logger], suite: Any) -> None:
    wb = wandb_of(loggers)
    if wb is not None and suite is not None:
        _guarded(wb, "eval tables", lambda: suite.log_to_wandb(wb.experiment))


def wandb_of(loggers: list[Logger]) -> WandbLogger | None:
    return next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)


def log_summary(loggers: list[Logger], summary: dict[str, Any]) -> None:
    wb = wandb_of(loggers)
    if wb is not None:
        _guarded(wb, "summary", lambda: wb.experiment.summary.update(summary))


def finish(loggers: list[Logger]) -> str | None:
    """Close the W&B run; return the `wandb sync` command when it was offline.

    Called from a `finally`: when an exception is on its way out the run is marked failed (exit code 1).
    With `logger.wandb.log_model=true` the saved adapter/ (or model/) directory is uploaded as an artifact
    beside the checkpoints Lightning uploads.
    """
    wb = wandb_of(loggers)
    if wb is None or rank_zero_only.rank != 0:  # DDP: the other ranks hold no W&B run
        return None
    import wandb

    failed = sys.exc_info()[0] is not None
    run_dir = Path(wb.experiment.dir).parent if wb.experiment else None
    if not failed and wb._log_model:
        _log_saved_model(wb)
    offline = os.environ.get("WANDB_MODE") == "offline"
    wandb.finish(exit_code=1 if failed else 0)
    return f"wandb sync {run_dir}" if offline and run_dir else None


def _log_saved_model(wb: WandbLogger) -> None:
    import wandb

    for sub in ("adapter", "model"):
        path = Path(wb.save_dir or ".") / sub
        if path.is_dir():
            artifact = wandb.Artifact(f"{sub}-{wb.experiment.id}", type="model")
            artifact.add_dir(str(path))
            wb.experiment.log_artifact(artifact, aliases=["best"])
            return
