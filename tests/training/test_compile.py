"""`compile=true`: training steps run a torch.compile'd decoder (dynamic shapes) and get the eager loss and
gradients; everything else (validation, generation) stays eager."""

from __future__ import annotations

import torch

from sftlab.model.forward import token_loss_sum
from sftlab.training.module import SFTModule
from tests.model.test_forward import lora_model, two_rows


def _loss_and_grads(model: torch.nn.Module, batch: dict, decoder=None) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    loss_sum, n = token_loss_sum(model, batch, decoder)
    (loss_sum / n).backward()
    return float(loss_sum / n), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_compiled_training_step_matches_eager(tiny_cfg, tiny_model_dir, tokenizer):
    model = lora_model(tiny_cfg, tiny_model_dir, dropout=0.0)
    module = SFTModule(model, optimizer=torch.optim.SGD, compile=True)
    assert SFTModule(model, optimizer=torch.optim.SGD)._train_decoder is None  # off by default
    batch = two_rows(tokenizer)
    eager_loss, eager = _loss_and_grads(model, batch)
    for cut in (None, -2):  # a second, shorter batch: dynamic shapes, no error
        part = batch if cut is None else {k: v[:, :cut] for k, v in batch.items()}
        loss, grads = _loss_and_grads(model, part, module._train_decoder)
    loss, grads = _loss_and_grads(model, batch, module._train_decoder)
    assert abs(loss - eager_loss) < 1e-4 and grads.keys() == eager.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager[name], rtol=1e-3, atol=1e-5)
    assert not any("_orig_mod" in k for k in module.state_dict())  # the compiled forward is no submodule
