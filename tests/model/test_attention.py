"""`model.attn_implementation=auto`: short CPU sequences computed eagerly give transformers' eager attention's
loss and gradients bit for bit (and SDPA's up to rounding), padded or packed (tests/data/test_packing.py runs
its packed == unpacked checks with it too); long ones and decoding steps go to SDPA itself."""

from __future__ import annotations

import pytest
import torch

from sftlab import build
from sftlab.model.attention import EAGER_MAX_LENGTH, NAME, eager_path
from sftlab.model.forward import token_loss_sum
from sftlab.model.load import load_model, model_source
from tests.conftest import chat_batch

CONVERSATIONS = [
    [{"role": "user", "content": "3 May 2001 in ISO?"}, {"role": "assistant", "content": "2001-05-03"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Why is the sky blue? " * 3},
        {"role": "assistant", "content": "Rayleigh scattering of sunlight by the air."},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
]


def model_with(attention: str) -> torch.nn.Module:
    cfg = build.compose(["model=tiny_random", f"model.attn_implementation={attention}"]).model
    model = load_model(cfg, model_source(cfg))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than the stock init, so attention patterns matter to the output
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def loss_and_grads(model, batch, autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = token_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if "self_attn" in n}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_short_padded_batch_is_transformers_eager_attention_bit_for_bit(tokenizer, chatml, autocast):
    batch = chat_batch(CONVERSATIONS, chatml, tokenizer)
    assert batch["attention_mask"].min() == 0 and batch["input_ids"].shape[1] <= EAGER_MAX_LENGTH
    auto = model_with("auto")
    assert auto.config._attn_implementation == NAME
    loss, grads = loss_and_grads(auto, batch, autocast)
    eager_loss, eager_grads = loss_and_grads(model_with("eager"), batch, autocast)
    assert grads.keys() == eager_grads.keys() and len(grads) > 0
    assert torch.equal(loss, eager_loss)
    assert all(torch.equal(grad, eager_grads[name]) for name, grad in grads.items())
    if not autocast:  # and SDPA's up to float rounding (in bf16 SDPA's CPU kernel rounds differently)
        sdpa_loss, sdpa_grads = loss_and_grads(model_with("sdpa"), batch, autocast)
        torch.testing.assert_close(loss, sdpa_loss, atol=1e-4, rtol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, sdpa_grads[name], atol=1e-4, rtol=1e-4, msg=name)


def test_long_sequences_run_sdpa_itself():
    ids = torch.randint(5, 1000, (2, EAGER_MAX_LENGTH + 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        auto = model_with("auto")(input_ids=ids).logits
        sdpa = model_with("sdpa")(input_ids=ids).logits
    assert torch.equal(auto, sdpa)


def test_which_calls_are_computed_eagerly():
    def q(length: int, device: str = "cpu") -> torch.Tensor:
        return torch.empty(2, 4, length, 8, device=device)

    causal = torch.ones(2, 1, 50, 50, dtype=torch.bool).tril()
    assert eager_path(q(50), q(50), causal)
    assert eager_path(q(50), q(50), None)  # no mask: plain causal
    assert not eager_path(q(30), q(50), None)  # a prefill after cached tokens: SDPA's alignment rules
    assert not eager_path(q(1), q(50), causal[:, :, -1:])  # decoding: SDPA's kernel is faster
    assert not eager_path(q(EAGER_MAX_LENGTH + 1), q(EAGER_MAX_LENGTH + 1), None)
    assert not eager_path(q(50), q(50), torch.zeros(2, 1, 50, 50))  # an additive float mask
    assert not eager_path(q(50, "meta"), q(50, "meta"), None)  # not a CPU
