"""New special tokens: add them to the tokenizer, grow the embeddings, and say which rows must train.

Typical use: ChatML markers for a base model that lacks them (`model.special_tokens=[<|im_start|>,<|im_end|>]
template=chatml`), or the never-trained chat tokens in a base model's vocabulary (Llama-3's `<|eot_id|>`).
Decisions, as in axolotl (`tokens:`) / TRL:
  * tokens the tokenizer already has are not added again, but their rows train too (they are listed because
    the template uses them and the base may never have seen them);
  * new embedding rows start at the mean of the existing rows (deterministic, unlike transformers' sampled
    `mean_resizing`), for the input and, when untied, the output embedding;
  * with an adapter only the new rows train (peft `trainable_token_indices`, see adapters.py), so every old
    row stays bit-identical and the adapter stays small; the trained rows are saved with the adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def add_special_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str] | None) -> list[int]:
    """Add the `tokens` the tokenizer lacks, as special tokens; return the ids of all listed tokens (the rows
    to train)."""
    wanted = [t for t in dict.fromkeys(tokens or []) if t]
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(wanted)
    if wanted:
        log.info(
            "Special tokens: %d listed, %d already in the vocabulary, %d added; rows to train: %s",
            len(wanted),
            len(wanted) - len(missing),
            len(missing),
            dict(zip(wanted, ids, strict=True)),
        )
    return list(ids)


@torch.no_grad()
def fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Grow the embedding matrices to cover every tokenizer id; new rows = mean of the old ones.

    Returns the number of rows added (0 when the model already has room, e.g. Qwen's padded vocabulary).
    """
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return 0
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    for layer in {id(x): x for x in layers if x is not None}.values():  # once when tied
        w = layer.weight
        w[old:] = w[:old].float().mean(dim=0, keepdim=True).to(w.dtype)
    log.info("Resized embeddings from %d to %d rows", old, len(tokenizer))
    return len(tokenizer) - old


def embedding_module_names(model: PreTrainedModel) -> dict[str, bool]:
    """Names (last path component, as peft matches them) of the input embedding and, when it is not tied to
    it, the output embedding: {name: is_input}."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    names = {}
    for name, module in model.named_modules():
        if module is emb:
            names[name.rsplit(".", 1)[-1]] = True
        elif module is head and not tied:
            names[name.rsplit(".", 1)[-1]] = False
    return names
