"""Segments -> input_ids and labels. The ONLY place labels are made.

Each segment is tokenized on its own and the pieces are concatenated (as torchtune does). Two guarantees
follow by construction:
  * the tokens of `template.generation_prompt(history)` are exactly the prefix of the training tokens that
    precede that assistant turn, so inference sees what training saw, and the first supervised token is the
    first response token (no BPE merge can straddle the prompt/response boundary);
  * a token is supervised iff it comes from a trained segment, so the end-of-turn token is trained even when
    pad == eos, and padding (added later by the collator) never is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from sftlab.data.templates import ChatTemplate, Segment

IGNORE_INDEX = -100
TRUNCATION = ("truncate", "drop")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    status: str  # "kept" | "truncated" | a drop reason: "too_long", "no_targets_after_truncation"

    @property
    def dropped(self) -> bool:
        return self.status not in ("kept", "truncated")


def tokenize_texts(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """Tokenize each distinct text once, in one batched call (template headers repeat on every row)."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}
    ids = tokenizer(unique, add_special_tokens=False)["input_ids"]
    return dict(zip(unique, ids, strict=True))


def segments_to_ids(
    segments: Sequence[Segment], vocab: dict[str, list[int]], bos_id: int | None
) -> tuple[list[int], list[int]]:
    input_ids: list[int] = [] if bos_id is None else [bos_id]
    labels: list[int] = [] if bos_id is None else [IGNORE_INDEX]
    for seg in segments:
        ids = vocab[seg.text]
        input_ids.extend(ids)
        labels.extend(ids if seg.train else [IGNORE_INDEX] * len(ids))
    return input_ids, labels


def fit_length(input_ids: list[int], labels: list[int], max_length: int | None, policy: str) -> Encoded:
    """Apply `max_length`: keep, truncate from the right, or drop; an example left with no target is dropped."""
    status = "kept"
    if max_length is not None and len(input_ids) > max_length:
        if policy == "drop":
            return Encoded([], [], "too_long")
        input_ids, labels, status = input_ids[:max_length], labels[:max_length], "truncated"
    # A target at position 0 is never predicted (nothing precedes it), so it does not count.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return Encoded([], [], "no_targets_after_truncation" if status == "truncated" else "no_targets")
    return Encoded(input_ids, labels, status)


def bos_id_for(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> int | None:
    return tokenizer.bos_token_id if template.bos else None


def encode_conversations(
    conversations: Sequence[Sequence[dict]],
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    truncation: str = "truncate",
    train_on: str = "all_assistant",
) -> list[Encoded]:
    """Render, tokenize (one batched tokenizer call) and mask a list of conversations."""
    rendered = [template.render(conv, train_on=train_on) for conv in conversations]
    vocab = tokenize_texts([s.text for segs in rendered for s in segs], tokenizer)
    bos_id = bos_id_for(template, tokenizer)
    out = []
    for segs in rendered:
        ids, labels = segments_to_ids(segs, vocab, bos_id)
        out.append(fit_length(ids, labels, max_length, truncation))
    return out


def encode_prompt(
    messages: Sequence[dict], template: ChatTemplate, tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """Token ids inference feeds the model for the next assistant turn (same tokenization as training)."""
    segs = template.generation_prompt(messages)
    ids, _ = segments_to_ids(segs, tokenize_texts([s.text for s in segs], tokenizer), bos_id_for(template, tokenizer))
    return ids
