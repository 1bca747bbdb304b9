"""tracking: offline W&B runs read back exactly, failed runs marked, the adapter artifact, sweep-job failures.

Real wandb in offline mode (conftest sets WANDB_MODE=offline): the reader is checked against what wandb itself
wrote, including a record longer than one 32 KiB block of the log.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger

from sftlab.cli import sweep
from sftlab.training import loggers
from tests.conftest import ROOT
from tests.helpers import wandb_log


def _logger(tmp_path, **kwargs) -> WandbLogger:
    return WandbLogger(project="sftlab-test", save_dir=str(tmp_path), **kwargs)


def _written_runs(root) -> list[wandb_log.OfflineRun]:
    """The runs under root once wandb's service has written everything: `finish` returns before the service
    has flushed the run log (seen here: a 7-byte file right after finish), `teardown` waits for it."""
    import wandb

    wandb.teardown()
    return wandb_log.offline_runs(root)


def test_offline_run_reads_back_identity_config_history_summary(tmp_path):
    wb = _logger(
        tmp_path, name="adapter.r=8,optimizer.lr=0.0001", group="multirun/x", tags=["dev", "adapter.r=8"]
    )
    big = "t" * 70_000  # one record over two 32 KiB blocks: FIRST, MIDDLE, LAST chunks
    wb.log_hyperparams(
        {"optimizer": {"lr": 1e-4}, "adapter": {"r": 8}, "params": {"trainable": 123}, "big": big}
    )
    wb.log_metrics({"val/loss": 1.5}, step=3)
    wb.log_metrics({"val/loss": 1.25}, step=6)
    loggers.log_summary([wb], {"val/best_loss": 1.25, "eval": {"exact_match": 0.5}})
    hint = loggers.finish([wb])

    (run,) = _written_runs(tmp_path)
    assert hint == f"wandb sync {run.path.parent}"
    assert (run.id, run.name, run.group, run.tags) == (
        wb.version,
        "adapter.r=8,optimizer.lr=0.0001",
        "multirun/x",
        ["dev", "adapter.r=8"],
    )
    assert run.config["optimizer"] == {"lr": 1e-4} and run.config["adapter"] == {"r": 8}
    assert run.config["params"] == {"trainable": 123} and run.config["big"] == big
    assert [(h["trainer/global_step"], h["val/loss"]) for h in run.history] == [(3, 1.5), (6, 1.25)]
    assert run.summary["val/best_loss"] == 1.25 and run.summary["eval"] == {"exact_match": 0.5}
    assert run.exit_code == 0


def test_finish_marks_the_run_failed_when_an_exception_is_on_its_way_out(tmp_path):
    wb = _logger(tmp_path)
    wb.log_metrics({"train/loss": 2.0}, step=1)
    with pytest.raises(RuntimeError, match="boom"):
        try:
            raise RuntimeError("boom")
        finally:
            loggers.finish([wb])
    (run,) = _written_runs(tmp_path)
    assert run.exit_code == 1


def test_log_model_uploads_the_saved_adapter_directory(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"0" * 16)
    wb = _logger(tmp_path, log_model=True)
    wb.log_metrics({"train/loss": 2.0}, step=1)
    loggers.finish([wb])
    (run,) = _written_runs(tmp_path)
    artifacts = [
        r.artifact for r in wandb_log.iter_records(run.path) if r.WhichOneof("record_type") == "artifact"
    ]
    assert [(a.name, a.type) for a in artifacts] == [(f"adapter-{run.id}", "model")]
    assert sorted(e.path for e in artifacts[0].manifest.contents) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_no_artifact_without_log_model(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    wb = _logger(tmp_path)
    wb.log_metrics({"train/loss": 2.0}, step=1)
    loggers.finish([wb])
    (run,) = _written_runs(tmp_path)
    assert not [r for r in wandb_log.iter_records(run.path) if r.WhichOneof("record_type") == "artifact"]


def test_record_failure_writes_the_traceback_closes_the_open_run_and_returns_nan(tmp_path):
    import wandb

    wb = _logger(tmp_path)
    wb.log_metrics({"train/loss": 2.0}, step=1)  # the run is open, as when a job fails before `finish`
    try:
        raise ValueError("data.max_length=1 leaves no target token")
    except ValueError as err:
        value = sweep.record_failure(tmp_path, err)
    assert math.isnan(value)
    assert wandb.run is None
    lines = (tmp_path / "error.txt").read_text().strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: data.max_length=1 leaves no target token"
    (run,) = _written_runs(tmp_path)
    assert run.exit_code == 1


def test_reader_refuses_a_file_that_is_not_a_wandb_log(tmp_path):
    path = tmp_path / "run-x.wandb"
    path.write_bytes(b"PK\x03\x04 not a run log")
    with pytest.raises(ValueError, match="not a W&B run log"):
        wandb_log.iter_records(path)


def test_secrets_in_overrides_are_masked_before_they_become_wandb_name_and_tags(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789")
    assert loggers._masked("eval.judge.api_key=sk-abc") == "eval.judge.api_key=***"
    assert loggers._masked("+hf_token=hf_abc") == "+hf_token=***"
    assert (
        loggers._masked("eval.judge.url=http://h/?k=sk-test-0123456789") == "eval.judge.url=http://h/?k=***"
    )
    assert loggers._masked("optimizer.lr=1e-4") == "optimizer.lr=1e-4"


def test_outside_hydra_there_is_no_job_identity():
    assert not sweep.in_sweep()
    assert loggers.job_identity(["dev"]) == {}


class CloseWandbAt(pl.Callback):
    """Closes the W&B run mid-training, as a crashed wandb service would: every later log call fails."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            import wandb

            wandb.finish()


def test_a_wandb_error_during_training_is_logged_and_training_continues(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "experiment=smoke",
            "logger=wandb",
            "trainer.max_steps=6",
            "+callbacks.close_wandb._target_=tests.training.test_loggers.CloseWandbAt",
            "+callbacks.close_wandb.step=2",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B error in log_metrics, training continues" in proc.stdout + proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 6  # trained to the end
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert (
        max(int(r["step"]) for r in rows if r.get("train/loss")) >= 5
    )  # CSV kept logging after the W&B error
