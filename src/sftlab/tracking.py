"""Experiment tracking: W&B offline-by-default when not logged in, one W&B run per job, and the run's summary.

W&B is never allowed to block or break training: without credentials it runs offline (no network waits),
and `finish()` is always called (in `finally`) so a multirun never bleeds one job's run into the next.

In a sweep every job is its own W&B run: the group is the sweep directory (all jobs of one
`python train.py -m ...` together), the name is the job's overrides (`adapter.r=8,optimizer.lr=0.0001`) and
the tags are the config's `tags` plus each override. Values set explicitly in `logger.wandb.*` win.

`read_offline_run` reads what an offline run wrote (`run-*.wandb`) without network or W&B account: the tests
use it to check each job's config, and it lets a user look into a run before `wandb sync`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import netrc
import os
import struct
import sys
import traceback
from dataclasses import dataclass, field
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

from sftlab.redact import redact

log = logging.getLogger(__name__)
MAX_TAG_LEN = 64  # W&B rejects longer tags


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def in_sweep() -> bool:
    """True inside a job of a Hydra multirun (`-m`, `hydra.mode=MULTIRUN`, Optuna search)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


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
    if not cfg:
        return []
    if "wandb" in cfg and not os.environ.get("WANDB_MODE") and not wandb_logged_in():
        log.info("W&B: not logged in, logging offline (sync later with `wandb sync`).")
        os.environ["WANDB_MODE"] = "offline"
    return [instantiate(_with_identity(c) if name == "wandb" else c) for name, c in cfg.items()]


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
    `sftlab.tracking_callbacks.CSVResume` stores in every checkpoint how many rows the file had, and when
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


# ---- reading offline runs ---------------------------------------------------------------------------------
# run-*.wandb is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of
# chunks, each with a 7-byte header (crc32, length, type); a record is a FULL chunk or FIRST, MIDDLE.., LAST.
# Each record is a serialized wandb_internal_pb2.Record. wandb 0.31 ships no Python reader for it.
_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What one offline W&B run recorded."""

    path: Path
    id: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None


def iter_records(path: str | Path) -> list[Any]:
    """The protobuf records of a `run-*.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = _HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a W&B run log (header {data[:7]!r})")
    records, pending, pos = [], b"", _HEADER.size
    while pos + _CHUNK.size <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK.size:  # a block tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = _CHUNK.unpack_from(data, pos)
        chunk = data[pos + _CHUNK.size : pos + _CHUNK.size + length]
        pos += _CHUNK.size + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        elif kind in (_MIDDLE, _LAST):
            pending += chunk
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _apply(target: dict[str, Any], item: Any, remove: bool = False) -> None:
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    if remove:
        target.pop(keys[-1], None)
    else:
        target[keys[-1]] = json.loads(item.value_json)


def read_offline_run(path: str | Path) -> OfflineRun:
    """Identity, config, final summary, history rows and exit code of one offline run.

    `path` is the `run-*.wandb` file or the `offline-run-*` directory holding it. Read it once the process
    that wrote it has exited (or after `wandb.teardown()`): `wandb.finish()` returns before wandb's service
    process has flushed the file.
    """
    path = Path(path)
    if path.is_dir():
        path = next(path.glob("run-*.wandb"))
    run = OfflineRun(path)
    for rec in iter_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.id, run.name, run.group, run.tags = r.run_id, r.display_name, r.run_group, list(r.tags)
        elif kind == "config":
            for item in rec.config.update:
                _apply(run.config, item)
        elif kind == "summary":
            for item in rec.summary.update:
                _apply(run.summary, item)
            for item in rec.summary.remove:
                _apply(run.summary, item, remove=True)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _apply(row, item)
            run.history.append(row)
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def offline_runs(root: str | Path) -> list[OfflineRun]:
    """Every offline W&B run under a run or sweep directory, sorted by path."""
    return [read_offline_run(p) for p in sorted(Path(root).rglob("offline-run-*/run-*.wandb"))]
