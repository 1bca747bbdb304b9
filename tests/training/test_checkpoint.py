"""Checkpoints: adapter-sized, written atomically, found by resume=auto; a NaN loss stops with them intact."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from sftlab import build
from sftlab.errors import ConfigError
from sftlab.model.adapters import LoRA
from sftlab.model.load import load_model, model_source
from sftlab.training import checkpoint
from sftlab.training.checkpoint import AtomicCheckpointIO, find_resume_checkpoint, resolve_resume
from sftlab.training.module import NonFiniteLossError, SFTModule
from tests.conftest import ROOT, quiet_trainer, small_iso_data, tiny_train_command


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


class KillDuringSecondSave(pl.Callback):
    """Its state is pickled into every full checkpoint; on the second one the pickling SIGKILLs the process,
    i.e. in the middle of writing that checkpoint."""

    def __init__(self) -> None:
        self.saves = 0

    def state_dict(self) -> dict:
        self.saves += 1
        return {"bomb": _Bomb()} if self.saves == 2 else {"saves": self.saves}


class _Bomb:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


def _quiet_trainer(callbacks: list, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer with sftlab's atomic checkpoint IO, as train.py configures it."""
    return quiet_trainer(callbacks, plugins=[AtomicCheckpointIO()], **kwargs)


# ---- atomic writes ---------------------------------------------------------------------------------------
def test_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path):
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        io.save_checkpoint({"global_step": 2, "bad": Unpicklable()}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.fixture(scope="module")
def killed_during_save(tmp_path_factory):
    """train.py on the tiny model, validation + checkpoints every 2 steps, SIGKILLed writing the second."""
    tmp = tmp_path_factory.mktemp("killed")
    run_dir = tmp / "run"
    cmd = tiny_train_command(
        run_dir,
        "eval=none",
        *small_iso_data(tmp),
        "data.batch_size=4",
        "trainer.max_epochs=1",
        "trainer.val_check_interval=2",
        "+callbacks.bomb._target_=tests.training.test_checkpoint.KillDuringSecondSave",
    )
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
    return run_dir


def test_sigkill_during_a_save_leaves_the_previous_last_checkpoint_readable(killed_during_save):
    ckpt_dir = killed_during_save / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and last["optimizer_states"]
    assert find_resume_checkpoint(ckpt_dir) == ckpt_dir / "last.ckpt"
    assert resolve_resume("auto", killed_during_save) == str(ckpt_dir / "last.ckpt")


def test_checkpoints_hold_only_the_trainable_weights(killed_during_save, tiny_cfg, tiny_model_dir):
    model = LoRA().apply(load_model(tiny_cfg.model, tiny_model_dir))  # the run's adapter: conf/adapter/lora
    trainable = {f"model.{n}" for n, p in model.named_parameters() if p.requires_grad}
    ckpt_dir = killed_during_save / "checkpoints"
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert set(last["state_dict"]) == trainable
    best = [p for p in ckpt_dir.glob("step*.ckpt")]
    assert len(best) == 1  # top-1 by val/loss
    best_ckpt = torch.load(best[0], weights_only=True)
    assert set(best_ckpt["state_dict"]) == trainable and "optimizer_states" not in best_ckpt
    assert last["SFTDataModule"]["sampler"] == {"epoch": 0, "consumed": 2}  # micro-batches trained


# ---- resume=auto -----------------------------------------------------------------------------------------
def test_resume_auto_picks_the_newest_readable_resumable_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 4, "optimizer_states": [{"s": 1}]}, ckpt_dir / "last.ckpt")
    io.save_checkpoint({"global_step": 4, "optimizer_states": [{"s": 1}]}, ckpt_dir / "step4-val1.0.ckpt")
    io.save_checkpoint({"global_step": 6, "state_dict": {}}, ckpt_dir / "step6-val0.9.ckpt")  # weights only
    (ckpt_dir / "step8-val0.8.ckpt").write_bytes(b"PK\x03\x04 truncated")  # unreadable
    assert find_resume_checkpoint(ckpt_dir) == ckpt_dir / "last.ckpt"
    assert resolve_resume("auto", tmp_path) == str(ckpt_dir / "last.ckpt")
    assert resolve_resume("auto", tmp_path / "fresh") is None  # first launch: nothing to resume
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume(str(ckpt_dir / "last.ckpt"), tmp_path / "other") == str(ckpt_dir / "last.ckpt")
    with pytest.raises(ConfigError, match=r"resume='nope\.ckpt'"):
        resolve_resume("nope.ckpt", tmp_path)


def _deepspeed_checkpoint(path, global_step: int, optimizer: bool = True) -> None:
    """The layout Lightning's DeepSpeedStrategy writes (`engine.save_checkpoint(path, tag="checkpoint")`):
    a directory named like the checkpoint file, Lightning's loop state in the model-states file, the optimizer
    in its own shards, and a `latest` file naming the tag. Written by hand: DeepSpeed needs CUDA to run."""
    (path / "checkpoint").mkdir(parents=True)
    torch.save(
        {"module": {}, "global_step": global_step, "epoch": 0}, path / "checkpoint/mp_rank_00_model_states.pt"
    )
    if optimizer:
        torch.save(
            {"optimizer_state_dict": {}}, path / "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt"
        )
    (path / "latest").write_text("checkpoint")


def test_resume_auto_finds_deepspeed_checkpoint_directories(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    _deepspeed_checkpoint(ckpt_dir / "last.ckpt", global_step=6)
    _deepspeed_checkpoint(ckpt_dir / "step4-val1.0.ckpt", global_step=4)
    _deepspeed_checkpoint(ckpt_dir / "step8-val0.8.ckpt", global_step=8, optimizer=False)  # not resumable
    assert find_resume_checkpoint(ckpt_dir) == ckpt_dir / "last.ckpt"
    assert resolve_resume("auto", tmp_path) == str(ckpt_dir / "last.ckpt")
    assert resolve_resume(str(ckpt_dir / "step4-val1.0.ckpt"), tmp_path) == str(
        ckpt_dir / "step4-val1.0.ckpt"
    )
    with pytest.raises(ConfigError, match="no such checkpoint"):
        resolve_resume(str(ckpt_dir), tmp_path)  # a directory, but no checkpoint


# ---- NaN / Inf guard -------------------------------------------------------------------------------------
class PoisonedAt(SFTModule):
    """Makes the loss of optimizer step `step` (0-based) NaN, as an fp16 overflow or a bad batch would."""

    poison_step = 3

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == self.poison_step:
            self._step_loss = self._step_loss * float("nan")
            loss = loss * float("nan")
        return loss


def test_non_finite_loss_stops_naming_the_step_and_the_checkpoint(
    tmp_path, tiny_cfg, tiny_model_dir, tokenizer, chatml
):
    data = small_iso_data(tmp_path)
    cfg = build.compose(["model=tiny_random", *data], output_dir=tmp_path)
    dm = instantiate(cfg.data, _partial_=True, batch_size=4)(tokenizer=tokenizer, template=chatml)
    dm.setup("fit")
    module = PoisonedAt(
        LoRA().apply(load_model(tiny_cfg.model, tiny_model_dir)), optimizer=instantiate(cfg.optimizer)
    )
    callbacks = [instantiate(cfg.callbacks.model_checkpoint), instantiate(cfg.callbacks.last_checkpoint)]
    trainer = _quiet_trainer(callbacks, max_epochs=1, val_check_interval=2)
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(NonFiniteLossError, match=f"at optimizer step 4 .*resume={last}"):
        trainer.fit(module, datamodule=dm)
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the poisoned step was never applied


# ---- size ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_run_checkpoints_are_a_small_fraction_of_the_base_model(tmp_path, tokenizer, chatml):
    """SmolLM2-135M + the default LoRA (r=16, all linear layers), one real optimizer step, real callbacks."""
    cfg = build.compose(small_iso_data(tmp_path, n_train=8, n_val=8), output_dir=tmp_path)
    source = model_source(cfg.model)
    base_bytes = sum(f.stat().st_size for f in Path(source).glob("*.safetensors"))
    dm = instantiate(cfg.data, _partial_=True)(tokenizer=tokenizer, template=chatml)
    dm.setup("fit")
    model = instantiate(cfg.adapter, _convert_="all").apply(load_model(cfg.model, source))
    module = SFTModule(model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler))
    callbacks = [instantiate(cfg.callbacks.model_checkpoint), instantiate(cfg.callbacks.last_checkpoint)]
    trainer = _quiet_trainer(callbacks, max_steps=1)
    trainer.fit(module, datamodule=dm)
    best = next((tmp_path / "checkpoints").glob("step*.ckpt")).stat().st_size
    last = (tmp_path / "checkpoints" / "last.ckpt").stat().st_size
    # The best checkpoint (what becomes the adapter) is under 5% of the base model; last.ckpt adds AdamW's
    # two moments per trainable weight, so it is about three times that, still an eighth of the base model.
    assert best < 0.05 * base_bytes, (best, base_bytes)
    assert last < 0.125 * base_bytes, (last, base_bytes)


# ---- early stopping and the best checkpoint -------------------------------------------------------------
def test_early_stopping_uses_patience_and_min_delta_and_the_best_weights_come_back(
    tmp_path, tiny_cfg, tiny_model_dir, tokenizer, chatml
):
    """min_delta larger than any change: the first validation is the last "improvement", so training stops
    after `patience` more validations; `checkpoint.restore_best` (sftlab-train, after fit) loads the
    best one."""
    from sftlab.training import checkpoint

    overrides = [
        "model=tiny_random",
        *small_iso_data(tmp_path),
        "callbacks.early_stopping.patience=2",
        "callbacks.early_stopping.min_delta=100",
    ]
    cfg = build.compose(overrides, output_dir=tmp_path)
    dm = instantiate(cfg.data, _partial_=True, batch_size=2)(tokenizer=tokenizer, template=chatml)
    dm.setup("fit")
    module = SFTModule(
        LoRA().apply(load_model(tiny_cfg.model, tiny_model_dir)),
        optimizer=instantiate(cfg.optimizer, lr=0.05),
    )
    best_cb = instantiate(cfg.callbacks.model_checkpoint)
    callbacks = [
        best_cb,
        instantiate(cfg.callbacks.last_checkpoint),
        instantiate(cfg.callbacks.early_stopping),
    ]
    trainer = _quiet_trainer(callbacks, max_epochs=1, val_check_interval=2)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 6  # 12 steps in the epoch; validations at 2 (best), 4, 6: stop
    best = torch.load(best_cb.best_model_path, weights_only=True)
    assert checkpoint.restore_best(module, best_cb.best_model_path)
    restored = module.trainable_state_dict()
    assert restored.keys() == best["state_dict"].keys()
    assert all(torch.equal(restored[k], best["state_dict"][k]) for k in restored)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6 and best["global_step"] in (2, 4, 6)


class ValidationSteps(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.steps.append(trainer.global_step)


def test_validation_and_its_checkpoint_never_fall_inside_an_accumulation_window(
    tmp_path, tiny_cfg, tiny_model_dir, tokenizer, chatml
):
    """val_check_interval=3 micro-batches with accumulation 2 would validate and save after 1.5 steps."""
    data = small_iso_data(tmp_path, n_train=12, n_val=2)
    cfg = build.compose(["model=tiny_random", *data], output_dir=tmp_path)
    dm = instantiate(cfg.data, _partial_=True, batch_size=1)(tokenizer=tokenizer, template=chatml)
    dm.setup("fit")
    module = SFTModule(
        LoRA(r=2).apply(load_model(tiny_cfg.model, tiny_model_dir)), optimizer=instantiate(cfg.optimizer)
    )
    seen = ValidationSteps()
    trainer = quiet_trainer(
        [seen],
        max_epochs=1,
        accumulate_grad_batches=2,
        val_check_interval=3,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.val_check_batch == 2
    assert seen.steps == [1, 2, 3, 4, 5, 6]  # after whole steps only (unaligned: 1 mid-window, 3, 4, 6)


def test_resume_allows_another_optimizer_kernel_but_not_another_update(tmp_path, caplog):
    """A run recorded before `optimizer.fused` was set (an older default) resumes with it, with a warning; a
    change of the update itself (weight decay) is still refused, naming it."""
    recorded = {"optimizer._target_": "torch.optim.AdamW", "optimizer.lr": 2e-4, "optimizer.weight_decay": 0}
    path = tmp_path / "last.ckpt"
    torch.save({checkpoint.SETTINGS_KEY: recorded}, path)

    now = {**recorded, "optimizer.fused": True}
    assert checkpoint.check_resume(str(path), now) == {"optimizer.fused": ("<absent>", True)}
    assert "optimizer.fused changed from '<absent>' to True" in caplog.text

    with pytest.raises(ConfigError, match=re.escape("optimizer.weight_decay: 0 in the checkpoint, 0.1 now")):
        checkpoint.check_resume(str(path), {**now, "optimizer.weight_decay": 0.1})
