"""Gradient checkpointing with LoRA: every trainable parameter gets the gradient it gets without it.

The trap: reentrant checkpointing back-propagates into a layer only when the layer's *input* requires grad.
With a frozen embedding it does not, so every LoRA weight inside a checkpointed layer silently gets no
gradient. transformers 5 now makes the embedding output require grad itself; sftlab does it explicitly too
(other versions and custom models). The control removes that hook and shows the gradients vanish, so the
check can catch the bug.
"""

from __future__ import annotations

import pytest
import torch

from sftlab.errors import SFTLabError
from sftlab.model.adapters import LoRA
from sftlab.model.forward import chunked_head_loss, enable_gradient_checkpointing, token_loss_sum, unwrap
from sftlab.model.load import load_model
from sftlab.training.module import SFTModule


def two_rows(tokenizer) -> dict[str, torch.Tensor]:
    ids = tokenizer(
        ["The quick brown fox jumps over the lazy dog", "Hello there, how are you today?"],
        padding=True,
        return_tensors="pt",
    )
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    labels[:, :3] = -100  # a prompt part that is not trained
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], "labels": labels}


def lora_model(tiny_cfg, tiny_model_dir, dropout: float, **options) -> torch.nn.Module:
    """The tiny model with seeded LoRA weights, B non-zero (at zero, every A gradient would be zero);
    `options` are further `LoRA` fields (use_dora, ...)."""
    torch.manual_seed(0)
    base = load_model(tiny_cfg.model, tiny_model_dir)
    model = LoRA(**{"r": 4, "lora_alpha": 8, "lora_dropout": dropout, **options}).apply(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _grads(tiny_cfg, tiny_model_dir, batch, mode) -> dict[str, torch.Tensor | None]:
    model = lora_model(tiny_cfg, tiny_model_dir, dropout=0.1)
    if mode == "reentrant_without_input_grads":
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        unwrap(model).disable_input_require_grads()
    elif mode:
        enable_gradient_checkpointing(model, mode)
    model.train()
    torch.manual_seed(1)  # same dropout masks in every mode
    loss_sum, n = token_loss_sum(model, batch)
    (loss_sum / n).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def reference(tiny_cfg, tiny_model_dir, tokenizer):
    return _grads(tiny_cfg, tiny_model_dir, two_rows(tokenizer), False)


@pytest.mark.parametrize("mode", [True, "non_reentrant", "reentrant"])
def test_every_lora_weight_gets_the_same_gradient_with_checkpointing(
    mode, reference, tiny_cfg, tiny_model_dir, tokenizer
):
    grads = _grads(tiny_cfg, tiny_model_dir, two_rows(tokenizer), mode)
    assert grads.keys() == reference.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad is not None and grad.abs().max() > 0, name
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7)


def test_control_reentrant_without_input_grads_loses_the_lora_gradients(tiny_cfg, tiny_model_dir, tokenizer):
    # Every LoRA weight sits in a checkpointed layer, so nothing in the graph requires grad any more.
    with pytest.raises(RuntimeError, match="does not require grad"):
        _grads(tiny_cfg, tiny_model_dir, two_rows(tokenizer), "reentrant_without_input_grads")


def test_module_enables_it_from_config(tiny_cfg, tiny_model_dir):
    model = LoRA(r=4).apply(load_model(tiny_cfg.model, tiny_model_dir))
    SFTModule(model, optimizer=torch.optim.SGD, gradient_checkpointing="reentrant")
    assert unwrap(model).is_gradient_checkpointing
    with pytest.raises(SFTLabError, match="gradient_checkpointing='sometimes'"):
        SFTModule(model, optimizer=torch.optim.SGD, gradient_checkpointing="sometimes")


# ---- chunked target loss ----------------------------------------------------------------------------------
def _loss_and_grads(model, batch, chunk_size) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss_sum, n = token_loss_sum(model, batch, chunk_size=chunk_size)
    (loss_sum / n).backward()
    return loss_sum.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["full_tied_head", "lora", "softcap"])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(kind, tiny_cfg, tiny_model_dir, tokenizer):
    batch = two_rows(tokenizer)
    if kind == "lora":
        model = lora_model(tiny_cfg, tiny_model_dir, dropout=0.0)
    else:  # every weight trains, the head tied to the embedding: its gradient comes from both ends
        model = load_model(tiny_cfg.model, tiny_model_dir)
        if kind == "softcap":
            unwrap(model).config.final_logit_softcapping = 3.0
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert n_targets == 11
    loss, grads = _loss_and_grads(model, batch, None)
    for chunk in (1, 4, 10):  # uneven last chunk, and one short of all rows
        chunked_loss, chunked_grads = _loss_and_grads(model, batch, chunk)
        torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=1e-6)
        assert chunked_grads.keys() == grads.keys() and len(grads) > 0
        for name, grad in grads.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)


def test_chunks_keep_no_logits_for_backward(tiny_cfg, tiny_model_dir):
    """What autograd saves between forward and backward: with chunks, nothing of vocabulary width (each
    chunk's logits are recomputed); without, the full (targets x vocab) logits."""
    model = load_model(tiny_cfg.model, tiny_model_dir)
    vocab = model.config.vocab_size
    hidden = torch.randn(40, model.config.hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (40,))

    def widest_saved(chunk_size):
        widths: list[int] = []

        def pack(t):
            widths.append(t.shape[-1] if t.dim() else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = chunked_head_loss(model, hidden, targets, chunk_size)
        loss.backward()
        return max(widths)

    assert widest_saved(None) == vocab
    assert widest_saved(8) < vocab
