"""The loss of an optimizer step is sum of token losses / target tokens of the whole step.

One optimizer step over the same 4 examples (target counts from 2 to about 90) as micro-batch 4 x accumulation
1, 1 x 4 and 2 x 2 must give the same gradients and the same logged `train/loss`, both equal to Hugging Face's
own token-mean loss over the 4 examples in one batch. A control module returning the per-micro-batch mean
(what Lightning + a plain `loss.mean()` would do) fails the same check, so the check can catch the bug.
"""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from sftlab import build
from sftlab.model.adapters import LoRA
from sftlab.model.forward import token_loss_sum
from sftlab.model.load import load_model
from sftlab.training.module import SFTModule
from tests.conftest import quiet_trainer

ANSWERS = [
    "Yes.",
    " ".join(f"step {i} of the long answer," for i in range(20)),
    "No.",
    " ".join(f"word{i}" for i in range(40)),
]
REL_TOL = 1e-5


class PerMicroBatchMean(SFTModule):
    """The bug under test: each micro-batch normalized by its own targets, then averaged by Lightning."""

    def training_step(self, batch, batch_idx):
        loss_sum, n_targets = token_loss_sum(self.model, batch)
        super().training_step(batch, batch_idx)  # keeps the logged step loss bookkeeping
        return loss_sum / n_targets


class GradCapture(pl.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a}]}
        for i, a in enumerate(ANSWERS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _datamodule(cfg, tokenizer, chatml, train_file, micro_batch: int):
    overrides = {
        "train_path": str(train_file),
        "val_path": None,
        "test_path": None,
        "shuffle": False,
        "batch_size": micro_batch,
    }
    dm = instantiate(cfg.data, _partial_=True, **overrides)(tokenizer=tokenizer, template=chatml)
    dm.setup("fit")
    return dm


def _lora_model(tiny_cfg, tiny_model_dir):
    torch.manual_seed(0)  # LoRA A is initialised from the global RNG: the same start for every layout
    model = LoRA(r=4, lora_alpha=8, lora_dropout=0.0).apply(load_model(tiny_cfg.model, tiny_model_dir))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero, which would leave every A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def one_step(
    module_cls,
    micro_batch,
    accumulate,
    tiny_cfg,
    tiny_model_dir,
    tokenizer,
    chatml,
    train_file,
    precision="32-true",
):
    """Gradients and logged train/loss of the first optimizer step."""
    cfg = build.compose(["model=tiny_random", "optimizer=sgd"], output_dir="/tmp/unused")
    module = module_cls(_lora_model(tiny_cfg, tiny_model_dir), optimizer=instantiate(cfg.optimizer))
    capture = GradCapture()
    trainer = quiet_trainer(
        [capture],
        precision=precision,
        max_steps=1,
        accumulate_grad_batches=accumulate,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=_datamodule(cfg, tokenizer, chatml, train_file, micro_batch))
    return capture.grads, float(trainer.callback_metrics["train/loss"])


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)) for k in a)


@pytest.fixture(scope="module")
def runs(tiny_cfg, tiny_model_dir, tokenizer, chatml, train_file):
    args = (tiny_cfg, tiny_model_dir, tokenizer, chatml, train_file)
    return {(mb, acc): one_step(SFTModule, mb, acc, *args) for mb, acc in ((4, 1), (1, 4), (2, 2))}


def test_examples_have_very_different_target_counts(tiny_cfg, tokenizer, chatml, train_file):
    cfg = build.compose(["model=tiny_random"], output_dir="/tmp/unused")
    counts = _datamodule(cfg, tokenizer, chatml, train_file, 4).splits["train"].num_targets
    assert min(counts) <= 4 and max(counts) >= 20 * min(counts)


def test_gradients_equal_across_accumulation_layouts(runs):
    ref, _ = runs[(4, 1)]
    assert any(g.abs().max() > 0 for g in ref.values())
    assert all(g.abs().max() > 0 for k, g in ref.items()), "every LoRA weight gets a gradient"
    for layout in ((1, 4), (2, 2)):
        assert _max_rel_diff(ref, runs[layout][0]) < REL_TOL, layout


def test_logged_loss_is_the_token_mean_of_the_whole_step(
    runs, tiny_cfg, tiny_model_dir, tokenizer, chatml, train_file
):
    cfg = build.compose(["model=tiny_random"], output_dir="/tmp/unused")
    dm = _datamodule(cfg, tokenizer, chatml, train_file, 4)
    batch = next(iter(dm.train_dataloader()))
    model = _lora_model(tiny_cfg, tiny_model_dir)
    with torch.no_grad():  # Hugging Face's own loss: mean over every target token of the batch
        expected = float(
            model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
        )
    for layout, (_, loss) in runs.items():
        assert loss == pytest.approx(expected, rel=REL_TOL), layout


def test_control_per_micro_batch_mean_fails_the_same_check(
    runs, tiny_cfg, tiny_model_dir, tokenizer, chatml, train_file
):
    grads, _ = one_step(PerMicroBatchMean, 1, 4, tiny_cfg, tiny_model_dir, tokenizer, chatml, train_file)
    assert _max_rel_diff(runs[(4, 1)][0], grads) > 100 * REL_TOL


def test_bf16_autocast_on_cpu_trains_the_same_step(
    runs, tiny_cfg, tiny_model_dir, tokenizer, chatml, train_file
):
    """`precision=bf16-mixed` (the CPU default where supported): same loss and gradients to bf16 accuracy."""
    grads, loss = one_step(
        SFTModule, 2, 2, tiny_cfg, tiny_model_dir, tokenizer, chatml, train_file, precision="bf16-mixed"
    )
    ref_grads, ref_loss = runs[(4, 1)]
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    assert all(g.dtype == torch.float32 for g in grads.values())  # fp32 master weights and gradients
    assert _max_rel_diff(ref_grads, grads) < 0.1
