"""The forward pass training and evaluation share: token-summed loss at target positions only, the model under
a PeftModel, and gradient checkpointing that keeps LoRA gradients flowing.

Logits are computed only at target positions: the decoder's hidden states are gathered where labels are not
-100 and only those rows go through the output head, so no (batch x length x vocab) fp32 tensor is built.
Those rows then go through the head and the cross-entropy `chunk_size` at a time, each chunk under activation
checkpointing: its logits are freed after its loss is summed and recomputed, one chunk at a time, in backward.
Peak loss memory is chunk x vocab whatever the number of targets (16k targets x 128k vocab would be 8 GiB of
fp32 logits at once). `torch.utils.checkpoint` rather than a hand-written autograd Function (Liger, cut
cross-entropy) because it recomputes whatever the head is: a LoRA-wrapped or tied head, a bias, a logit
softcap, autocast, and the gradient of a trainable head in a full fine-tune all come out exactly as unchunked.

The prompt tokens every row of a batch starts with run once (`shared_prefix_loss`, prefix.py) wherever that
computes the same loss and gradients (`shares_prefixes`); elsewhere the rows run whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

from sftlab.data.collate import BOUNDARY_KEYS, boundaries
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.errors import SFTLabError
from sftlab.model import attention
from sftlab.model.prefix import keys_and_values_only, shared_context_length, shared_prefix_rows

# Rows of the output head computed at once: 1024 x 128k vocab is 512 MiB of fp32 logits (Llama 3), and the
# matmul stays large enough to run at full speed on a GPU; micro-batches with fewer targets are not chunked.
DEFAULT_LOSS_CHUNK = 1024


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The *ForCausalLM under a PeftModel (LoRA layers are injected in place, so it trains the adapter)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def token_loss_sum(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    decoder: Callable[..., Any] | None = None,
    chunk_size: int | None = DEFAULT_LOSS_CHUNK,
    share_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over target positions, number of target positions). `decoder`: a
    compiled forward of the model's decoder to run instead of the eager one. `chunk_size`: target rows per
    output-head chunk (None or 0: all at once). `share_prefix`: the prompt tokens every row starts with, up
    to the first target, run once for the batch (prefix.py; not for packed rows, a compiled decoder, or a
    forward that draws dropout masks)."""
    lm = unwrap(model)
    # Packed rows carry position_ids restarting per example and no 2-D mask: from those transformers builds a
    # block-diagonal causal mask (eager/SDPA). Padding is at the right, so causal attention never lets a real
    # token see it; it only needs its label -100. See data/packing.py. Flash-attention reads position ids as
    # boundaries only for a batch of one row; with more, every packed row would attend across its examples,
    # so the boundaries go explicitly too (cu_seq_lens, as DataCollatorWithFlattening gives them), over the
    # rows laid end to end: flash then runs its varlen kernel on all rows at once. Eager and SDPA ignore them.
    packed = "position_ids" in batch
    bounds = {}
    if packed:
        bounds = {k: batch[k] for k in BOUNDARY_KEYS if k in batch} or boundaries(batch["position_ids"])
        bounds.pop("seq_idx", None)
    if share_prefix and not packed and decoder is None:
        result = shared_prefix_loss(lm, batch, chunk_size)
        if result is not None:
            return result
    hidden = (decoder or lm.get_decoder())(
        input_ids=batch["input_ids"],
        attention_mask=None if packed else batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
        **bounds,
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    loss_sum = chunked_head_loss(lm, hidden[:, :-1][mask], targets[mask], chunk_size)
    return loss_sum, mask.sum()


def shared_prefix_loss(
    lm: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`token_loss_sum` of a right-padded batch with the prompt tokens its rows share run once
    (prefix.SharedPrefixRows); None where that may change the result (`shares_prefixes`) or would not pay."""
    ids = batch["input_ids"]
    if not shares_prefixes(lm, ids.shape[1]):
        return None
    shared = shared_context_length(ids, batch["labels"], batch.get("attention_mask"))
    if not shared:
        return None
    rows = shared_prefix_rows(batch, shared)
    # A mask of ones rather than none: from positions that restart, transformers would infer packed rows and
    # build a T x T mask, which the rows' attention never reads.
    hidden = lm.get_decoder()(
        input_ids=rows.input_ids,
        attention_mask=torch.ones_like(rows.input_ids),
        position_ids=rows.position_ids,
        use_cache=False,
        shared_prefix_rows=rows,
    ).last_hidden_state[0]
    if not rows.complete(lm.config.num_hidden_layers):
        # a layer did not hand the rows on to attention: this model runs its rows whole from now on
        vars(lm)["_sftlab_span"] = 0
        return None
    mask = rows.targets != IGNORE_INDEX
    return chunked_head_loss(lm, hidden[mask], rows.targets[mask], chunk_size), mask.sum()


def shares_prefixes(lm: torch.nn.Module, longest: int) -> bool:
    """Whether a batch of rows at most `longest` tokens long may run its shared prefix once
    (prefix.SharedPrefixRows): through sftlab's attention (which computes the single row's attention per
    row), every layer plain attention (a linear-attention or convolution layer would mix the rows; a sliding
    window shorter than the rows would be ignored), and a forward that draws no random numbers (a prefix
    computed once would get one dropout mask for every row, where rows computed whole get one each)."""
    config = lm.config
    if config._attn_implementation != attention.NAME or longest > attention_span(lm):
        return False
    if not lm.training:
        return True
    if getattr(config, "attention_dropout", 0):
        return False
    return not any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in lm.modules())


def attention_span(lm: torch.nn.Module) -> float:
    """How many tokens back every layer of the model attends: inf for full attention, the shortest sliding
    window, or 0 when a layer is not plain attention or did not compute through SharedPrefixRows."""
    if "_sftlab_span" not in vars(lm):
        cache = DynamicCache(config=lm.config)
        windows = [layer.sliding_window for layer in cache.layers if type(layer) is DynamicSlidingWindowLayer]
        vars(lm)["_sftlab_span"] = min(windows, default=math.inf) if keys_and_values_only(cache) else 0
    return vars(lm)["_sftlab_span"]


def head_loss_sum(lm: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the output head on `hidden` rows (n x hidden) against `targets` (n)."""
    logits = lm.get_output_embeddings()(hidden).float()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap:  # Gemma 2 caps logits; skipping it would train a different function than inference runs
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_head_loss(
    lm: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int | None
) -> torch.Tensor:
    """`head_loss_sum` over `chunk_size` rows at a time; with autograd, each chunk's logits are recomputed in
    backward instead of kept (non-reentrant checkpointing restores autocast and RNG state for the
    recompute)."""
    if not chunk_size or hidden.shape[0] <= chunk_size:
        return head_loss_sum(lm, hidden, targets)
    keep_graph = torch.is_grad_enabled()
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True):
        if keep_graph:
            part = checkpoint(head_loss_sum, lm, h, t, use_reentrant=False)
        else:
            part = head_loss_sum(lm, h, t)
        total = total + part
    return total


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
