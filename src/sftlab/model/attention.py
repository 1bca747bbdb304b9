"""`model.attn_implementation=auto` (the default): SDPA, except short sequences on a CPU, computed eagerly.

PyTorch's CPU SDPA kernel (flash attention for CPU) has a fixed cost per call that dominates at the lengths
most SFT rows have: forward + backward of 8 rows x 64 tokens x 9 heads took 18 ms in bf16 on one thread, two
matmuls and a softmax 6 ms (`python -m sftlab.bench.attention`). In the default run that kernel was 21 % of a
training step; computing those calls eagerly made training 1.27 x faster (interleaved bench rounds). Past a
few hundred tokens the kernel wins (eager keeps a rows x heads x length^2 score tensor per layer for
backward, and is slower), and for decoding (one query token) it is always faster; on a GPU SDPA is left
alone. So the choice is made per call, from the query's device and length, which no single transformers
implementation does.

Registered with transformers' `AttentionInterface` under `NAME`, with SDPA's mask function, so the masks
(padding, packed rows' block-diagonal causal masks, sliding windows) are exactly those SDPA gets; the eager
path reads them as SDPA does: a boolean mask (True = attend), or none = causal.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sftlab_auto"
# Longest key length computed eagerly: the crossover. Forward + backward of one layer's attention (8 rows,
# 9 heads, bf16, one thread, quiet machine), eager / SDPA: 64 tokens 6.3 / 17.9 ms; 128: 23.7 / 39.4;
# 192: 40.6 / 40.3; 256: 66.6 / 60.2 (docs/performance.md has the table at two threads too).
EAGER_MAX_LENGTH = 192


def implementation(configured: str | None) -> str:
    """The name to hand `from_pretrained` for `model.attn_implementation` (registering `auto`'s)."""
    if (configured or "auto") != "auto":
        return configured
    AttentionInterface.register(NAME, auto_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def eager_path(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether this call is computed eagerly: a CPU prefill or training step of at most EAGER_MAX_LENGTH
    keys, with a boolean mask or a plain causal one (query and keys the same length)."""
    q_length, kv_length = query.shape[2], key.shape[2]
    if query.device.type != "cpu" or q_length == 1 or kv_length > EAGER_MAX_LENGTH:
        return False
    if attention_mask is None:
        return q_length == kv_length
    return attention_mask.dtype == torch.bool


def auto_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: (batch, heads, length, head_dim) in, (batch, length, heads,
    head_dim) out. A `shared_prefix_rows` keyword (prefix.SharedPrefixRows, from the loss) computes the
    attention of its single row per original row, each part through this function again."""
    rows = kwargs.pop("shared_prefix_rows", None)
    if rows is not None:
        return rows.attend(
            auto_attention_forward, module, query, key, value, dropout=dropout, scaling=scaling, **kwargs
        )
    unsupported = kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
    if unsupported or not getattr(module, "is_causal", True) or not eager_path(query, key, attention_mask):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return eager_attention_forward(module, query, key, value, attention_mask, dropout, scaling), None


def eager_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
) -> torch.Tensor:
    """Two matmuls and a softmax, with SDPA's mask conventions (boolean, True = attend; none = causal).
    transformers' own eager functions live in each model's file and take an additive float mask instead."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is None:
        length = query.shape[2]
        attention_mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    # The dtype's minimum rather than -inf: a row with nothing to attend to (a left-padded prompt's padding)
    # gets uniform weights instead of NaN, as in transformers' eager attention; its output is never read.
    scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()
