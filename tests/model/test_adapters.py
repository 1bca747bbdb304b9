"""Every adapter option trains what it should and nothing else, with and without gradient checkpointing."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hydra.utils import instantiate

from sftlab import build
from sftlab.model.adapters import trainable_parameters
from sftlab.model.forward import token_loss_sum
from sftlab.model.load import load_model, load_tokenizer, model_source
from sftlab.training.module import SFTModule
from tests.conftest import chat_batch

ADAPTERS = ["lora", "qlora", "dora", "rslora", "lora8bit", "none"]
CONVERSATIONS = [
    [
        {"role": "user", "content": "Convert to ISO 8601: March 5, 2021"},
        {"role": "assistant", "content": "2021-03-05"},
    ],
    [
        {"role": "user", "content": "Convert to ISO 8601: 1 Jan 1999"},
        {"role": "assistant", "content": "1999-01-01"},
    ],
]


def build_adapted(adapter: str, gradient_checkpointing: bool):
    cfg = build.compose(["model=tiny_random", f"adapter={adapter}"])
    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    adapter_obj = instantiate(cfg.adapter, _convert_="all")
    template = instantiate(cfg.template, _convert_="all")
    batch = chat_batch(CONVERSATIONS, template, tokenizer)
    model = adapter_obj.apply(
        load_model(cfg.model, source, quantization_config=adapter_obj.quantization_config())
    )
    module = SFTModule(
        model, optimizer=partial(torch.optim.AdamW, lr=1e-2), gradient_checkpointing=gradient_checkpointing
    )
    return module, batch


def backward(model, batch):
    loss_sum, n = token_loss_sum(model, batch)
    (loss_sum / n).backward()


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["no_gc", "gc"])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_trainable_weights_get_gradients_and_frozen_weights_stay_bit_identical(
    adapter, gradient_checkpointing
):
    torch.manual_seed(0)
    module, batch = build_adapted(adapter, gradient_checkpointing)
    model = module.model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # By storage, not name: a tied output head is the embedding under a second state-dict key.
    trained = {p.data_ptr() for p in trainable.values()}
    frozen = {k: v.clone() for k, v in model.state_dict().items() if v.data_ptr() not in trained}
    assert trainable and (adapter == "none") == (
        not any(n for n, p in model.named_parameters() if not p.requires_grad)
    )
    # As in train.py (base-model evaluation, validation passes): an eval-mode no-grad forward before training.
    # bitsandbytes 0.50 repacks 4-bit weights for a CPU inference kernel on it (and `state_dict()` above
    # unpacks them again, so this must come after); training through packed weights loses gradients.
    with torch.no_grad():
        model.eval()(input_ids=batch["input_ids"])
    model.train()
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    # Step 1 moves LoRA B off zero; until then LoRA A has a zero gradient by construction, and every B a
    # non-zero one that reaches it only through the base layers above (not yet through other adapters).
    backward(model, batch)
    no_grad = [n for n, p in trainable.items() if "lora_B" in n and not p.grad.abs().sum() > 0]
    assert not no_grad, f"step 1: {len(no_grad)} LoRA B tensors without gradient, e.g. {no_grad[:3]}"
    opt.step()
    opt.zero_grad()
    backward(model, batch)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{len(no_grad)} trainable tensors without gradient, e.g. {no_grad[:3]}"
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in trainable.items())
    state = model.state_dict()
    changed = [k for k, v in frozen.items() if not torch.equal(v, state[k])]
    assert not changed, f"frozen weights changed: {changed[:3]}"


@pytest.mark.parametrize(("adapter", "layer"), [("qlora", "Linear4bit"), ("lora8bit", "Linear8bitLt")])
def test_quantized_adapters_really_quantize_the_base(adapter, layer):
    module, _ = build_adapted(adapter, False)
    # bitsandbytes' own layers (peft's LoRA wrappers around them carry the same class names).
    kinds = [
        type(m).__name__ for m in module.model.modules() if type(m).__module__.startswith("bitsandbytes")
    ]
    assert kinds.count(layer) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    trainable, total = trainable_parameters(module.model)
    assert 0 < trainable < total / 10


@pytest.mark.parametrize(("adapter", "flag"), [("dora", "use_dora"), ("rslora", "use_rslora")])
def test_lora_variants_set_their_peft_flag(adapter, flag):
    module, _ = build_adapted(adapter, False)
    config = module.model.peft_config["default"]
    assert getattr(config, flag) is True
    layer = module.model.base_model.model.model.layers[0].self_attn.q_proj
    expected = config.lora_alpha / (math.sqrt(config.r) if adapter == "rslora" else config.r)
    assert layer.scaling["default"] == pytest.approx(expected)
    if adapter == "dora":
        assert "default" in layer.lora_magnitude_vector
