"""The optimizer wiring of SFTModule: a fused kernel (the default AdamW's) trains with gradient clipping
under bf16 autocast, where Lightning alone refuses it, and the clipping is applied; under fp16's loss
scaler, where a fused step would clip scaled gradients, the unfused kernel is used instead."""

from __future__ import annotations

import json
import logging
from functools import partial

import pytest
import torch
from pytorch_lightning.plugins.precision import MixedPrecision

from sftlab.data.datamodule import SFTDataModule
from sftlab.model.adapters import LoRA
from sftlab.model.load import load_model
from sftlab.training.module import SFTModule
from tests.conftest import quiet_trainer

CLIP = 1e-3


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory, tokenizer, chatml):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"A {i}."},
            ]
        }
        for i in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = SFTDataModule(
        tokenizer=tokenizer,
        template=chatml,
        train_path=str(path),
        val_path=None,
        test_path=None,
        batch_size=4,
    )
    dm.setup("fit")
    return dm


def one_step(optimizer, precision, tiny_cfg, tiny_model_dir, datamodule):
    """(the optimizer the module built, every trainable weight before and after one step); `precision`: a
    Trainer precision flag or a precision plugin."""
    torch.manual_seed(0)
    model = LoRA(r=4, lora_alpha=8, lora_dropout=0.0).apply(load_model(tiny_cfg.model, tiny_model_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    module = SFTModule(model, optimizer=optimizer)
    trainer = quiet_trainer(
        **({"precision": precision} if isinstance(precision, str) else {"plugins": [precision]}),
        max_steps=1,
        gradient_clip_val=CLIP,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return trainer.optimizers[0], before, after


def test_a_fused_optimizer_clips_under_bf16_autocast(tiny_cfg, tiny_model_dir, datamodule):
    """SGD at lr 1 moves the weights by exactly the clipped gradient: its norm is the clip value."""
    sgd = partial(torch.optim.SGD, lr=1.0, fused=True)
    optimizer, before, after = one_step(sgd, "bf16-mixed", tiny_cfg, tiny_model_dir, datamodule)
    assert optimizer.defaults["fused"] is True
    moved = torch.sqrt(sum(((after[n] - before[n]) ** 2).sum() for n in before))
    assert float(moved) == pytest.approx(CLIP, rel=1e-3)


def test_fp16_loss_scaling_with_clipping_uses_the_unfused_kernel(
    tiny_cfg, tiny_model_dir, datamodule, caplog
):
    # fp16 autocast with a loss scaler on the CPU: Lightning's flag `16-mixed` is for GPUs, its plugin is not.
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    adamw = partial(torch.optim.AdamW, lr=1e-3, fused=True)
    with caplog.at_level(logging.WARNING, logger="sftlab.training.module"):
        optimizer, before, after = one_step(adamw, fp16, tiny_cfg, tiny_model_dir, datamodule)
    assert not optimizer.defaults["fused"]
    assert "using the unfused kernel" in caplog.text
    assert any(not torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize("share", [True, False])
def test_share_prefix_reaches_the_loss_of_the_steps(share, tiny_model_dir, tokenizer, chatml):
    from sftlab import build
    from sftlab.model.prefix import ROW_MULTIPLE, shared_context_length
    from tests.conftest import chat_batch

    system = {"role": "system", "content": "Answer every question with one short sentence and nothing else."}
    questions = ("Why?", "Really, why is that?")
    convs = [
        [system, {"role": "user", "content": q}, {"role": "assistant", "content": "Yes."}] for q in questions
    ]
    batch = chat_batch(convs, chatml, tokenizer)
    cfg = build.compose(["model=tiny_random", f"share_prefix={str(share).lower()}"])
    model = LoRA(r=4, lora_dropout=0.0).apply(load_model(cfg.model, tiny_model_dir))
    module = build.module(cfg, model)
    seen: list[tuple] = []
    model.get_input_embeddings().register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        module.validation_step(batch, 0)
    shared = shared_context_length(batch["input_ids"], batch["labels"], batch["attention_mask"])
    tokens = int(batch["attention_mask"].sum()) - shared  # two rows: the prefix counted once
    one_row = (1, -(-tokens // ROW_MULTIPLE) * ROW_MULTIPLE)
    assert shared > 16 and seen == ([one_row] if share else [tuple(batch["input_ids"].shape)])
