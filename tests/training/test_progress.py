"""The progress line: what a piped run's log shows instead of the progress bar."""

from __future__ import annotations

import itertools
import logging
import sys

import pytest
import pytorch_lightning as pl
from hydra.utils import instantiate

from sftlab import build
from sftlab.model.adapters import LoRA
from sftlab.model.load import load_model
from sftlab.training.module import SFTModule
from sftlab.training.progress import ProgressLog
from tests.conftest import quiet_trainer, small_iso_data


class Record(pl.Callback):
    """After each optimizer step: the input tokens (padding excluded) of all batches so far, and the loss."""

    def __init__(self) -> None:
        self.seen = 0
        self.tokens = {0: 0}  # optimizer step -> tokens up to and including it
        self.loss: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += int(batch["attention_mask"].sum())
        step = trainer.global_step
        if step not in self.tokens:  # this batch completed an optimizer step
            self.tokens[step] = self.seen
            self.loss[step] = float(trainer.callback_metrics["train/loss"])


def fit(tmp_path, tiny_cfg, tiny_model_dir, tokenizer, chatml, progress: ProgressLog, **trainer_kwargs):
    cfg = build.compose(["model=tiny_random", *small_iso_data(tmp_path, n_train=16, n_val=2)])
    dm = instantiate(cfg.data, _partial_=True, batch_size=2)(tokenizer=tokenizer, template=chatml)
    module = SFTModule(
        LoRA(r=2).apply(load_model(tiny_cfg.model, tiny_model_dir)), optimizer=instantiate(cfg.optimizer)
    )
    record = Record()
    trainer = quiet_trainer(
        [record, progress], max_epochs=2, enable_checkpointing=False, limit_val_batches=0, **trainer_kwargs
    )
    trainer.fit(module, datamodule=dm)
    return record


def test_a_line_every_n_steps_with_loss_tokens_per_second_elapsed_and_eta(
    tmp_path, tiny_cfg, tiny_model_dir, tokenizer, chatml, caplog
):
    """16 examples, batch 2, accumulation 2, 2 epochs: 8 optimizer steps, a line every 3 and at the last.
    The clock advances 10 s at train start and at each optimizer step."""
    clock = itertools.count(0, 10).__next__
    progress = ProgressLog(every_n_steps=3, every_s=None, when="always", clock=clock)
    with caplog.at_level(logging.INFO, logger="sftlab.training.progress"):
        rec = fit(tmp_path, tiny_cfg, tiny_model_dir, tokenizer, chatml, progress, accumulate_grad_batches=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "sftlab.training.progress"]

    def rate(previous: int, step: int) -> str:  # tokens/s since the previous line, 10 s per step
        return f"{(rec.tokens[step] - rec.tokens[previous]) / (10 * (step - previous)):,.0f}"

    assert lines == [
        f"step 3/8 (38%) | epoch 1/2 | train/loss {rec.loss[3]:.4f} | {rate(0, 3)} tokens/s"
        " | elapsed 0:00:30 | ETA 0:00:50",
        f"step 6/8 (75%) | epoch 2/2 | train/loss {rec.loss[6]:.4f} | {rate(3, 6)} tokens/s"
        " | elapsed 0:01:00 | ETA 0:00:20",
        f"step 8/8 (100%) | epoch 2/2 | train/loss {rec.loss[8]:.4f} | {rate(6, 8)} tokens/s"
        " | elapsed 0:01:20 | ETA 0:00:00",
    ]
    assert sorted(rec.tokens) == list(range(9))  # 8 optimizer steps of 2 micro-batches


@pytest.mark.parametrize(("tty", "when"), [(True, "not_a_terminal"), (False, "never")])
def test_no_lines_on_a_terminal_or_when_off(
    tmp_path, tiny_cfg, tiny_model_dir, tokenizer, chatml, caplog, monkeypatch, tty, when
):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    progress = ProgressLog(every_n_steps=1, every_s=None, when=when)
    with caplog.at_level(logging.INFO, logger="sftlab.training.progress"):
        fit(tmp_path, tiny_cfg, tiny_model_dir, tokenizer, chatml, progress, max_steps=2)
    assert [r for r in caplog.records if r.name == "sftlab.training.progress"] == []


def test_piped_stdout_gets_lines_by_default(
    tmp_path, tiny_cfg, tiny_model_dir, tokenizer, chatml, caplog, monkeypatch
):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    progress = ProgressLog(every_n_steps=1, every_s=None)
    with caplog.at_level(logging.INFO, logger="sftlab.training.progress"):
        fit(tmp_path, tiny_cfg, tiny_model_dir, tokenizer, chatml, progress, max_steps=2)
    steps = [r.getMessage().split(" | ")[0] for r in caplog.records if r.name == "sftlab.training.progress"]
    assert steps == ["step 1/2 (50%)", "step 2/2 (100%)"]


def test_the_default_config_logs_progress_every_30_seconds_off_a_terminal():
    cb = instantiate(build.compose([]).callbacks.progress_log)
    assert (type(cb), cb.every_n_steps, cb.every_s, cb.when) == (ProgressLog, None, 30, "not_a_terminal")
