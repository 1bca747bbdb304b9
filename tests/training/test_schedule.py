"""Learning-rate schedules: exact multipliers, warmup as steps or ratio, and a schedule that spans the run."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from sftlab import build
from sftlab.model.adapters import LoRA
from sftlab.model.load import load_model
from sftlab.training.module import SFTModule
from sftlab.training.schedule import lr_factor, warmup_schedule, warmup_steps
from tests.conftest import ISO_DATA, quiet_trainer


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (
            "cosine",
            [1 / 3, 2 / 3, 1.0, 0.5 * (1 + 0.7071067811865476), 0.5, 0.5 * (1 - 0.7071067811865476), 0.0],
        ),
        ("linear", [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0]),
        ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_multipliers_with_two_warmup_steps(kind, expected):
    steps = [0, 1, 2, 4, 6, 8, 10]  # total 10, warmup 2: decay over steps 2..10
    got = [lr_factor(s, kind=kind, warmup=2, total=10, min_lr_ratio=0.0) for s in steps]
    assert got == pytest.approx(expected, abs=1e-12)


def test_min_lr_ratio_is_the_floor():
    assert lr_factor(10, kind="cosine", warmup=0, total=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(5, kind="linear", warmup=0, total=10, min_lr_ratio=0.1) == pytest.approx(0.55)


def test_warmup_below_one_is_a_ratio_else_steps():
    assert warmup_steps(0.1, 200) == 20
    assert warmup_steps(0.05, 30) == 2  # rounded
    assert warmup_steps(7, 200) == 7
    assert warmup_steps(0, 200) == 0


def test_warmup_schedule_drives_the_optimizer():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = warmup_schedule(opt, total_steps=4, kind="linear", warmup=1)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.5 * 2 / 3, 0.5 / 3])


class LRRecorder(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_schedule_spans_exactly_the_run_with_accumulation(
    tmp_path, tiny_cfg, tiny_model_dir, tokenizer, chatml
):
    """20 examples, micro-batch 2, accumulation 2, 2 epochs: 10 steps, from estimated_stepping_batches."""
    lines = (ISO_DATA / "train.jsonl").read_text().splitlines()[:20]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = build.compose(
        ["model=tiny_random", "optimizer=sgd", "scheduler=linear", "scheduler.warmup=0.2"],
        output_dir=tmp_path,
    )
    dm = instantiate(
        cfg.data,
        _partial_=True,
        train_path=str(tmp_path / "train.jsonl"),
        val_path=None,
        test_path=None,
        batch_size=2,
    )(tokenizer=tokenizer, template=chatml)
    dm.setup("fit")
    model = LoRA(r=2).apply(load_model(tiny_cfg.model, tiny_model_dir))
    module = SFTModule(model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler))
    recorder = LRRecorder()
    trainer = quiet_trainer(
        [recorder], max_epochs=2, accumulate_grad_batches=2, enable_checkpointing=False, limit_val_batches=0
    )
    trainer.fit(module, datamodule=dm)
    base = cfg.optimizer.lr
    expected = [base * lr_factor(s, kind="linear", warmup=2, total=10, min_lr_ratio=0.0) for s in range(10)]
    assert trainer.global_step == 10
    assert recorder.lrs == pytest.approx(expected, rel=1e-12)
    assert recorder.lrs[-1] == pytest.approx(base * 0.125)  # step 9 of 10: one step before the floor
