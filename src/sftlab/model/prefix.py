"""The tokens every row of a batch starts with, run through the model once.

A batch's rows often begin with the same tokens: a system prompt, a tool list, a fixed instruction, the
template's header. Under causal attention those tokens compute the same thing in every row.

Generation (generate.py) runs them as a one-row call and copies its KV cache to every row
(`Cache.batch_repeat_interleave`), as vLLM's prefix caching does within a batch; each row's own tokens
follow. Only caches of keys and values alone are copied: a linear-attention layer's convolution and
recurrent states are not copied by `batch_repeat_interleave` (a hybrid layer inherits the keys-and-values
copy and would silently share one state between rows), or the layer has no copy at all.

The training and validation loss (forward.py) lays the batch out as one row instead (`SharedPrefixRows`):
the prefix up to the first target once, then every row's own tokens, in a single model call, with attention
computed per original row. A second call would read every weight again, which on a CPU costs about what the
saved rows gain. Autograd sums every row's gradient into the one prefix computation, as it would over the
prefix's copies.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from sftlab.data.tokenize import IGNORE_INDEX

# The single row's length is a multiple of this: every new length costs a CPU's matmul library (oneDNN) a new
# kernel for each of a step's matmul shapes, which it builds once and keeps (about 6 MB a length here, +315 MB
# over the default run's 100 batches of as many lengths), where batches of rows padded to the longest
# repeat a few widths. A few untrained tokens more a step (at most 15).
ROW_MULTIPLE = 16

# Shared tokens below which a batch runs whole: one more model call costs more than a few tokens per row save
# (on a GPU, a call is launch-bound at these sizes).
SHARED_PREFIX_MIN = 16


def cache_argument(forward: Any) -> str:
    """The name a model's forward takes its KV cache by (and returns it under): `cache`, renamed from
    `past_key_values` during transformers 5.x."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Leading tokens every prompt of a generation batch has in common, when computing them once pays: 0 for
    a single prompt or fewer than SHARED_PREFIX_MIN tokens. At least one token of each prompt is left out, so
    every row's last prompt token runs in the batched call that gives its first logits."""
    if len(prompts) < 2:
        return 0
    n = min(map(len, prompts)) - 1
    first = prompts[0]
    for prompt in prompts[1:]:
        n = next((i for i in range(n) if prompt[i] != first[i]), n)
    return n if n >= SHARED_PREFIX_MIN else 0


def shared_context_length(
    input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None
) -> int:
    """Leading tokens every row of a right-padded training batch has in common, when computing them once
    pays (as `shared_prefix_length`). The prefix ends before the position that predicts a row's first target
    (labels are the input ids, shifted in the loss), so no logit is ever needed from it, and at least one
    real token of each row is left out."""
    rows, width = input_ids.shape
    if rows < 2 or width <= SHARED_PREFIX_MIN:
        return 0
    lengths = row_lengths(input_ids, attention_mask)
    targets = labels != IGNORE_INDEX
    first_target = torch.where(targets.any(1), targets.int().argmax(1), lengths)
    limit = int(torch.minimum(lengths, first_target).min()) - 1
    if limit < SHARED_PREFIX_MIN:
        return 0
    same = (input_ids[:, :limit] == input_ids[:1, :limit]).all(0)
    n = int(same.int().cumprod(0).sum())
    return n if n >= SHARED_PREFIX_MIN else 0


def row_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Each row's real tokens in a right-padded batch (all of them without a mask)."""
    if attention_mask is not None:
        return attention_mask.sum(1)
    return torch.full((len(input_ids),), input_ids.shape[1], device=input_ids.device)


def keys_and_values_only(cache: Any) -> bool:
    """Whether every layer of a KV cache holds keys and values alone, all of which `batch_repeat_interleave`
    copies to each row."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers)


class SharedPrefixRows:
    """A right-padded batch whose rows share their first `shared` tokens, laid out as one row: the
    prefix once, then each row's own tokens without padding (`input_ids`, `position_ids`: 1 x T; `targets`:
    T, the label each position predicts). The linear layers and norms run over the T tokens once.

    Attention must not let one row's tokens see another's: `attend` computes it per row, each row's queries
    against the prefix's keys and its own, the cost of the rows computed whole. It runs inside the model's
    attention function (attention.py, which gets this object as a keyword argument transformers passes down
    to it) and counts its calls, so a model whose layers do not hand it on is noticed (`complete`) rather
    than trained with attention across rows.
    """

    def __init__(
        self, input_ids: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor, shared: int
    ) -> None:
        device = input_ids.device
        self.shared, self.rows, self.calls = shared, len(lengths), 0
        self.width = width = int((lengths - shared).max())  # the longest row's own tokens
        keep = torch.arange(width, device=device) < (lengths - shared)[:, None]  # rows x width: not padding
        self.input_ids = torch.cat([input_ids[0, :shared], input_ids[:, shared : shared + width][keep]])[None]
        positions = (torch.arange(width, device=device) + shared).expand(self.rows, -1)[keep]
        self.position_ids = torch.cat([torch.arange(shared, device=device), positions])[None]
        # position t of a row predicts its label t + 1; a row's last token predicts nothing
        follow = torch.cat([labels[:, shared + 1 :], labels.new_full((self.rows, 1), IGNORE_INDEX)], dim=1)
        self.targets = torch.cat([labels.new_full((shared,), IGNORE_INDEX), follow[:, :width][keep]])
        # where each row's own tokens sit among the rows x width padded ones, in the single row's order
        self.slots = keep.flatten().nonzero().squeeze(1)
        # a row's queries see the whole prefix and its own earlier tokens (so a padding query sees the prefix)
        own_keys = keep[:, None, :] & torch.ones(width, width, dtype=torch.bool, device=device).tril()
        self.mask = torch.cat([keep.new_ones(self.rows, width, shared), own_keys], dim=2)[:, None]

    def attend(
        self,
        attention: Any,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """`attention(module, q, k, v, mask, **kwargs)` (a transformers attention function) over the single
        row's (1, heads, T, head_dim) tensors, per row; returns (1, T, heads, head_dim)."""
        n, rows, width = self.shared, self.rows, self.width
        head, _ = attention(module, query[:, :, :n], key[:, :, :n], value[:, :, :n], None, **kwargs)

        # index_copy / index_select rather than indexing with a mask: their gradients are index_select and
        # index_add, where a mask's would be an index_put that sorts its indices (a quarter of a millisecond a
        # call, four calls a layer)
        def padded(x: torch.Tensor) -> torch.Tensor:  # (1, heads, T, d) -> (rows, heads, width, d)
            heads, d = x.shape[1], x.shape[3]
            spread = x.new_zeros(heads, rows * width, d).index_copy(1, self.slots, x[0, :, n:])
            return spread.view(heads, rows, width, d).transpose(0, 1)

        def with_prefix(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, :, :n].expand(rows, -1, -1, -1), padded(x)], dim=2)

        out, _ = attention(module, padded(query), with_prefix(key), with_prefix(value), self.mask, **kwargs)
        self.calls += 1
        own = out.reshape(rows * width, *out.shape[2:]).index_select(0, self.slots)
        return torch.cat([head[0], own])[None], None

    def complete(self, layers: int) -> bool:
        """Whether every one of the model's `layers` attention layers computed through `attend`."""
        return self.calls == layers


def shared_prefix_rows(batch: dict[str, torch.Tensor], shared: int) -> SharedPrefixRows:
    """The batch's rows as one row behind their `shared` common tokens (`shared_context_length`)."""
    ids, labels = batch["input_ids"], batch["labels"]
    lengths = row_lengths(ids, batch.get("attention_mask"))
    extra = -(shared + int((lengths - shared).sum())) % ROW_MULTIPLE
    # the last row runs on by `extra` untrained tokens, after all of its own: no real token sees them
    if extra:
        ids = torch.nn.functional.pad(ids, (0, extra))
        labels = torch.nn.functional.pad(labels, (0, extra), value=IGNORE_INDEX)
        lengths = lengths.clone()
        lengths[-1] += extra
    return SharedPrefixRows(ids, labels, lengths, shared)
