"""Segments -> input_ids and labels. The ONLY place labels are made.

Each segment is tokenized on its own and the pieces are concatenated (as torchtune does). Two guarantees
follow by construction:
  * the tokens of `template.generation_prompt(history)` are exactly the prefix of the training tokens that
    precede that assistant turn, so inference sees what training saw, and the first supervised token is the
    first response token (no BPE merge can straddle the prompt/response boundary);
  * a token is supervised iff it comes from a trained segment, so the end-of-turn token is trained even when
    pad == eos, and padding (added later by the collator) never is.
The label of position 0 is always -100: nothing predicts the first token, and in a packed row this is what
keeps one example's first token from being a target of the previous example's last token.

Sentencepiece-style tokenizers (Llama 2, Mistral, Gemma; a `Metaspace` pre-tokenizer) prepend a dummy-prefix
space ("▁") to any text tokenized alone, which per-segment tokenization would insert at every segment
boundary. For those, the first segment of a sequence is tokenized as is (a whole-string tokenization has the
prefix there too) and every later segment is tokenized behind a "\n" whose tokens are then stripped
(torchtune's trick), so "[/INST]" + " Paris" yields the same pieces as inside the whole string. Byte-level BPE
tokenizers (GPT-2, Llama 3, SmolLM2, Qwen) add nothing and are tokenized plainly.

Message content is tokenized with special-token parsing off (`Segment.literal`): a chat marker typed in the
content ("<|im_end|>", "[INST]") is text, never a control token, as in the vendors' own encoders.

Plain-text documents (format `text`) are not templated: BOS (where the tokenizer adds one itself, as in
pre-training) + text + EOS, all trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from sftlab.data.formats import Conversation
from sftlab.data.reasoning import apply_reasoning, inline_to_field
from sftlab.data.templates import ChatTemplate, Segment, TokenizerTemplate
from sftlab.errors import DataError

Template = ChatTemplate | TokenizerTemplate

IGNORE_INDEX = -100
TRUNCATION = ("truncate", "drop")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    status: str  # "kept" | "truncated" | a drop reason: too_long, no_targets, no_targets_after_truncation
    position_ids: list[int] | None = None  # set for packed rows only: restarts at 0 for every example

    @property
    def dropped(self) -> bool:
        return self.status not in ("kept", "truncated")


def dummy_prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int] | None:
    """The ids of "\n" if the tokenizer adds a sentencepiece dummy prefix to a text alone, else None."""
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if not pieces or not str(pieces[0]).startswith("▁"):
        return None
    return tokenizer("\n", add_special_tokens=False)["input_ids"]


def encode_batch(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, *, literal: bool = False
) -> list[list[int]]:
    """Token ids of each text, no special tokens added; `literal`: special-token strings in the texts stay
    text. Calls the Rust tokenizer directly when there is one: the transformers wrapper spends as long
    converting encodings as the tokenizer spends encoding."""
    split_special = bool(getattr(tokenizer, "split_special_tokens", False))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=literal or split_special)[
            "input_ids"
        ]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no character offsets
    backend.encode_special_tokens = literal or split_special
    try:
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = split_special  # as the wrapper leaves it


def tokenize_texts(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    continuation: bool = False,
    literal: bool = False,
) -> dict[str, list[int]]:
    """Tokenize each distinct text once, in one batched call (template headers repeat on every row).

    `continuation`: the texts follow other text in the sequence, so a dummy-prefix space must not be added.
    `literal`: message text, in which special-token strings are not special.
    """
    unique = list(dict.fromkeys(texts))
    if not unique:
        return {}
    marker = dummy_prefix_ids(tokenizer) if continuation else None
    if marker is None:
        return dict(zip(unique, encode_batch(unique, tokenizer, literal=literal), strict=True))
    ids = encode_batch(["\n" + t for t in unique], tokenizer, literal=literal)
    if any(i[: len(marker)] != marker for i in ids):  # "\n" merged into the text: no clean cut exists
        raise ValueError("cannot strip the sentencepiece dummy prefix: '\\n' does not tokenize separately")
    return {t: i[len(marker) :] for t, i in zip(unique, ids, strict=True)}


Key = tuple[str, bool]  # (segment text, literal)


def _tokenize_segments(
    segments: Sequence[Segment], tokenizer: PreTrainedTokenizerBase, *, continuation: bool = False
) -> dict[Key, list[int]]:
    out: dict[Key, list[int]] = {}
    for literal in (False, True):
        texts = [s.text for s in segments if s.literal == literal]
        ids = tokenize_texts(texts, tokenizer, continuation=continuation, literal=literal)
        out.update({(t, literal): i for t, i in ids.items()})
    return out


@dataclass
class Vocab:
    """Token ids per (text, literal): `first` for a sequence's first segment, `rest` for the others."""

    first: dict[Key, list[int]]
    rest: dict[Key, list[int]]

    @classmethod
    def build(cls, rendered: Sequence[Sequence[Segment]], tokenizer: PreTrainedTokenizerBase) -> Vocab:
        if dummy_prefix_ids(tokenizer) is None:  # one batched call per kind for everything
            both = _tokenize_segments([s for segs in rendered for s in segs], tokenizer)
            return cls(both, both)
        first = _tokenize_segments([segs[0] for segs in rendered if segs], tokenizer)
        rest = _tokenize_segments([s for segs in rendered for s in segs[1:]], tokenizer, continuation=True)
        return cls(first, rest)


def segments_to_ids(
    segments: Sequence[Segment], vocab: Vocab, bos_id: int | None
) -> tuple[list[int], list[int]]:
    input_ids: list[int] = [] if bos_id is None else [bos_id]
    labels: list[int] = [] if bos_id is None else [IGNORE_INDEX]
    lookup = vocab.first
    for seg in segments:
        ids = lookup[seg.text, seg.literal]
        lookup = vocab.rest
        input_ids += ids
        labels += ids if seg.train else [IGNORE_INDEX] * len(ids)
    if labels:
        labels[0] = IGNORE_INDEX  # never predicted; packed, it must not be the previous example's target
    return input_ids, labels


def fit_length(input_ids: list[int], labels: list[int], max_length: int | None, policy: str) -> Encoded:
    """Apply `max_length`: keep, truncate from the right, or drop; one left with no target is dropped."""
    status = "kept"
    if max_length is not None and len(input_ids) > max_length:
        if policy == "drop":
            return Encoded([], [], "too_long")
        input_ids, labels, status = input_ids[:max_length], labels[:max_length], "truncated"
    # A target at position 0 is never predicted (nothing precedes it), so it does not count.
    if labels.count(IGNORE_INDEX) == len(labels):  # labels[0] is always -100 (segments_to_ids)
        return Encoded([], [], "no_targets_after_truncation" if status == "truncated" else "no_targets")
    return Encoded(input_ids, labels, status)


def bos_id_for(template: Template, tokenizer: PreTrainedTokenizerBase) -> int | None:
    return tokenizer.bos_token_id if template.uses_bos() else None


def document_bos_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """BOS for a plain-text document: the one the tokenizer adds by itself, if any."""
    ids = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return bos if bos is not None and ids and ids[0] == bos else None


def render(
    conversation: Conversation,
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    train_on: str,
    reasoning: str = "keep_last",
) -> list[Segment]:
    """Template segments of a conversation, or a trained document + EOS for plain text."""
    if isinstance(conversation, str):
        return [Segment(conversation, True), Segment(tokenizer.eos_token, True)]
    return template.render(apply_reasoning(conversation, reasoning), train_on=train_on)


def _named(index: int, conversation: Conversation, err: DataError) -> DataError:
    """The error of one conversation, saying which one (rows carry no file:line past conversion)."""
    first = next((m["content"] for m in conversation if m["role"] == "user"), "") if conversation else ""
    return DataError(f"conversation {index} (first user message {first[:60]!r}): {err}")


def encode_conversations(
    conversations: Sequence[Conversation],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    truncation: str = "truncate",
    train_on: str = "all_assistant",
    reasoning: str = "keep_last",
) -> list[Encoded]:
    """Render, tokenize (one batched tokenizer call) and mask a list of conversations."""
    template.bind(tokenizer)
    rendered = []
    for k, conv in enumerate(conversations):
        try:
            rendered.append(render(conv, template, tokenizer, train_on, reasoning))
        except DataError as err:
            raise _named(k, conv, err) from None
    vocab = Vocab.build(rendered, tokenizer)
    bos_id = bos_id_for(template, tokenizer)
    doc_bos_id = document_bos_id(tokenizer) if any(isinstance(c, str) for c in conversations) else None
    out = []
    for conv, segs in zip(conversations, rendered, strict=True):
        ids, labels = segments_to_ids(segs, vocab, doc_bos_id if isinstance(conv, str) else bos_id)
        out.append(fit_length(ids, labels, max_length, truncation))
    return out


def encode_prompt(
    messages: Sequence[dict],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    reasoning: str = "keep_last",
) -> list[int]:
    """Token ids inference feeds the model for the next assistant turn (same tokenization as training;
    `reasoning` as data.reasoning: by default earlier turns' reasoning is dropped, as in training, also when
    a client sends it inline as `<think>…</think>`)."""
    template.bind(tokenizer)
    segs = template.generation_prompt(apply_reasoning(inline_to_field(messages), reasoning))
    ids, _ = segments_to_ids(segs, Vocab.build([segs], tokenizer), bos_id_for(template, tokenizer))
    return ids


def token_spans(
    conversation: Conversation,
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    *,
    train_on: str = "all_assistant",
    reasoning: str = "keep_last",
) -> list[tuple[str, bool, int]]:
    """(kind, trained, number of tokens) of each segment of a conversation, in order: what sftlab-inspect
    shows as reasoning, tool calls, tool results and schemas. The token counts sum to the length of the
    conversation's `encode_conversations` ids (before truncation), BOS counted as untrained text."""
    template.bind(tokenizer)
    segs = render(conversation, template, tokenizer, train_on, reasoning)
    vocab = Vocab.build([segs], tokenizer)
    doc = isinstance(conversation, str)
    bos_id = document_bos_id(tokenizer) if doc else bos_id_for(template, tokenizer)
    bos = [("text", False, 1)] if bos_id is not None else []
    return bos + [
        (seg.kind, seg.train, len((vocab.first if k == 0 else vocab.rest)[seg.text, seg.literal]))
        for k, seg in enumerate(segs)
    ]
