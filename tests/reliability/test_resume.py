"""Resume that tells the truth: a checkpoint records what its run depends on and a resume honours a new
learning rate or refuses, naming each difference; non-finite weights are never saved, so the advice to
resume with a lower rate works; an unreadable checkpoint is never silently replaced by a fresh start; and the
adapter written at the end is the best checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from sftlab.errors import ConfigError, SFTLabError
from sftlab.training import checkpoint
from tests.reliability.conftest import snapshot, train_in_process


class RecordLR(pl.Callback):
    """Appends {"step", "lr"} for every optimizer step to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "lr": optimizer.param_groups[0]["lr"]}) + "\n")


class StopAt(pl.Callback):
    """Raises (the process 'dies') when the batch of optimizer step `step` is about to run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"stopped at step {self.step}")


class BlowUpAt(pl.Callback):
    """Makes the gradients of optimizer step `step` infinite, as an exploding loss does: after clipping and
    the update, the trainable weights are NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("inf"))


def _callback(name: str, cls: type, **kwargs) -> list[str]:
    args = [f"+callbacks.{name}._target_={cls.__module__}.{cls.__qualname__}"]
    return args + [f"+callbacks.{name}.{k}={v}" for k, v in kwargs.items()]


EVERY_STEP = ("callbacks.last_checkpoint.every_n_train_steps=1", "scheduler.warmup=0", "scheduler=constant")


def test_resume_applies_a_new_learning_rate_and_refuses_other_changes(finished_run, tmp_path):
    base, _ = finished_run
    run_dir, lrs = tmp_path / "run", tmp_path / "lr.jsonl"
    record = _callback("lr", RecordLR, path=lrs)
    with pytest.raises(RuntimeError, match="stopped at step 2"):
        train_in_process(run_dir, base / "data", *EVERY_STEP, *record, *_callback("stop", StopAt, step=2))
    before = snapshot(run_dir / "checkpoints")

    with pytest.raises(ConfigError) as err:  # before the model loads: one message, each difference named
        changed = ("adapter.r=4", "data.batch_size=2")
        train_in_process(run_dir, base / "data", *EVERY_STEP, "resume=auto", *changed)
    message = str(err.value)
    assert "2 difference(s)" in message
    assert "adapter.r: 16 in the checkpoint, 4 now" in message
    assert "data.batch_size: 4 in the checkpoint, 2 now" in message
    assert snapshot(run_dir / "checkpoints") == before

    train_in_process(run_dir, base / "data", *EVERY_STEP, *record, "resume=auto", "optimizer.lr=0.002")
    steps = [json.loads(line) for line in lrs.read_text().splitlines()]
    first_lr = steps[0]["lr"]
    assert first_lr != 0.002
    assert steps == [
        {"step": 0, "lr": first_lr},
        {"step": 1, "lr": first_lr},
        {"step": 2, "lr": 0.002},  # the new rate, from the resume point on
        {"step": 3, "lr": 0.002},
    ]


@pytest.mark.slow  # two short trainings
def test_non_finite_weights_are_never_saved_and_the_advice_trains_on(finished_run, tmp_path):
    base, _ = finished_run
    run_dir = tmp_path / "run"
    with pytest.raises(checkpoint.NonFiniteWeightsError, match=r"lower optimizer\.lr"):
        train_in_process(run_dir, base / "data", *EVERY_STEP, *_callback("boom", BlowUpAt, step=1))
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 1
    assert all(t.isfinite().all() for t in last["state_dict"].values())
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(t.isfinite().all() for t in state.values()), ckpt.name

    # The advice: resume with a lower learning rate. It is applied, and the run finishes with finite weights.
    train_in_process(run_dir, base / "data", *EVERY_STEP, "resume=auto", "optimizer.lr=1e-5")
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(t.isfinite().all() for t in adapter.values())
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 4


def test_truncated_last_checkpoint_falls_back_or_stops(finished_run, tmp_path):
    _, finished = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    ckpts = run_dir / "checkpoints"
    shutil.copy(ckpts / "last.ckpt", ckpts / "older.ckpt")  # a resumable checkpoint besides last.ckpt
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])
    assert checkpoint.resolve_resume("auto", run_dir) == str(ckpts / "older.ckpt")

    (ckpts / "older.ckpt").unlink()  # only the truncated last.ckpt and the weights-only best remain
    before = snapshot(run_dir)
    with pytest.raises(SFTLabError, match=r"none of the checkpoints .* can resume training .*last\.ckpt"):
        train_in_process(run_dir, Path(finished).parent / "data", "resume=auto")
    assert snapshot(run_dir) == before


@pytest.mark.slow  # a training of its own
def test_final_adapter_is_the_best_checkpoint_when_it_is_not_the_last(finished_run, tmp_path):
    base, _ = finished_run
    run_dir = tmp_path / "run"
    # mode=max makes the best checkpoint the one with the highest validation loss: the first of the two (the
    # loss falls at this rate), which is not the last. save_top_k=2 keeps both.
    train_in_process(
        run_dir,
        base / "data",
        "optimizer.lr=0.01",
        "callbacks.model_checkpoint.mode=max",
        "callbacks.model_checkpoint.save_top_k=2",
        "callbacks.early_stopping.mode=max",
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = Path(metrics["best_checkpoint"])
    assert best.name.startswith("step2-") and len(list(best.parent.glob("step*.ckpt"))) == 2
    best_state = torch.load(best, weights_only=True)["state_dict"]
    last_state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == len(best_state)
    differs_from_last = False
    for key, tensor in adapter.items():
        ckpt_key = "model." + key.replace(".weight", ".default.weight")
        assert torch.equal(tensor, best_state[ckpt_key]), key
        differs_from_last |= not torch.equal(tensor, last_state[ckpt_key])
    assert differs_from_last


@pytest.mark.parametrize("interval", ["1.0", "2"])
def test_max_steps_between_validations_validates_and_saves_the_last_step(finished_run, tmp_path, interval):
    """max_steps=3 ends the run mid-epoch (6 batches), after the last due validation (at the epoch's end, or
    at step 2): the run still validates at step 3, checkpoints it, and early stopping finds val/loss."""
    base, _ = finished_run
    run_dir = tmp_path / "run"
    train_in_process(run_dir, base / "data", "trainer.max_steps=3", f"trainer.val_check_interval={interval}")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert metrics["val"]["loss"] is not None
