"""The forward pass training and evaluation share: token-summed loss at target positions only, the model under
a PeftModel, and gradient checkpointing that keeps LoRA gradients flowing.

Logits are computed only at target positions: the decoder's hidden states are gathered where labels are not
-100 and only those rows go through the output head, so no (batch x length x vocab) fp32 tensor is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel

from sftlab.data.collate import BOUNDARY_KEYS
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.errors import SFTLabError


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The *ForCausalLM under a PeftModel (LoRA layers are injected in place, so it trains the adapter)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def token_loss_sum(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    decoder: Callable[..., Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over target positions, number of target positions). `decoder`: a
    compiled forward of the model's decoder to run instead of the eager one."""
    lm = unwrap(model)
    # Packed rows carry position_ids restarting per example and no 2-D mask: from those transformers builds a
    # block-diagonal causal mask (eager/SDPA) or varlen attention (flash). Padding is at the right, so causal
    # attention never lets a real token see it; it only needs its label -100. See data/packing.py. Flash
    # attention takes the boundaries from cu_seq_lens instead (data/collate.py: boundaries).
    packed = "position_ids" in batch
    hidden = (decoder or lm.get_decoder())(
        input_ids=batch["input_ids"],
        attention_mask=None if packed else batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        **{k: batch[k] for k in BOUNDARY_KEYS if k in batch and k != "seq_idx"},
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logits = lm.get_output_embeddings()(hidden[:, :-1][mask]).float()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap:  # Gemma 2 caps logits; skipping it would train a different function than inference runs
        logits = torch.tanh(logits / softcap) * softcap
    loss_sum = F.cross_entropy(logits, targets[mask], reduction="sum")
    return loss_sum, mask.sum()


def enable_gradient_checkpointing(model: torch.nn.Module, mode: bool | str) -> None:
    """`True`/"non_reentrant" (recommended) or "reentrant" activation checkpointing of the decoder layers.

    Reentrant checkpointing only back-propagates into a segment whose *inputs* require grad; with a frozen
    embedding they do not, and the LoRA weights inside each checkpointed layer would silently get no gradient.
    `enable_input_require_grads` makes the embedding output require grad, which fixes that for both modes.
    """
    if mode not in (True, "reentrant", "non_reentrant"):
        raise SFTLabError(f"gradient_checkpointing={mode!r}: use false, true (non-reentrant) or reentrant.")
    lm = unwrap(model)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    lm.enable_input_require_grads()
