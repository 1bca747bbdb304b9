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

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
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
    """The ids of "\n" if the tokenizer adds a sentencepiece dummy prefix to a text alone, else None.
    Found once per tokenizer object (three calls of the transformers wrapper: a millisecond a chunk)."""
    memo = vars(tokenizer)
    if "_sftlab_dummy_prefix" not in memo:
        ids = tokenizer("a", add_special_tokens=False)["input_ids"]
        pieces = tokenizer.convert_ids_to_tokens(ids)
        strips = pieces and str(pieces[0]).startswith("▁")
        memo["_sftlab_dummy_prefix"] = (
            tokenizer("\n", add_special_tokens=False)["input_ids"] if strips else None
        )
    return memo["_sftlab_dummy_prefix"]


def plain_backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The Rust tokenizer (None for a slow one) without the padding and truncation the transformers wrapper
    leaves set on it after a call (a padded batch leaves padding on): called directly, it would pad or cut
    every text of a batch. The wrapper sets them again at its next call."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.padding is not None:
        backend.no_padding()
    if backend is not None and backend.truncation is not None:
        backend.no_truncation()
    return backend


def encode_batch(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, *, literal: bool = False
) -> list[list[int]]:
    """Token ids of each text, no special tokens added; `literal`: special-token strings in the texts stay
    text. Calls the Rust tokenizer directly when there is one: the transformers wrapper spends as long
    converting encodings as the tokenizer spends encoding."""
    split_special = bool(getattr(tokenizer, "split_special_tokens", False))
    backend = plain_backend(tokenizer)
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


def encode_segment_texts(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, *, continuation: bool = False, literal: bool = False
) -> list[list[int]]:
    """Token ids of each text, in one batched call.

    `continuation`: the texts follow other text in the sequence, so a dummy-prefix space must not be added.
    `literal`: message text, in which special-token strings are not special.
    """
    marker = dummy_prefix_ids(tokenizer) if continuation and texts else None
    if marker is None:
        return encode_batch(texts, tokenizer, literal=literal) if texts else []
    ids = encode_batch(["\n" + t for t in texts], tokenizer, literal=literal)
    if any(i[: len(marker)] != marker for i in ids):  # "\n" merged into the text: no clean cut exists
        raise ValueError("cannot strip the sentencepiece dummy prefix: '\\n' does not tokenize separately")
    return [i[len(marker) :] for i in ids]


# The entry of each distinct text of a vocabulary: (template markup, message text), since the two are
# tokenized apart (Segment.literal). Indexed by a segment's `literal`, so a lookup builds no key.
Texts = tuple[dict[str, int], dict[str, int]]


def _distinct(segments: Iterable[Segment]) -> tuple[list[str], list[str]]:
    """The distinct markup texts and message texts of `segments`, each in the order first seen."""
    markup: dict[str, None] = {}
    message: dict[str, None] = {}
    for seg in segments:
        (message if seg.literal else markup)[seg.text] = None
    return list(markup), list(message)


@dataclass
class Vocab:
    """The token ids of every distinct segment, end to end in `tokens` (entry i is
    `tokens[starts[i] : starts[i] + lengths[i]]`), and the entry of each text: `first[literal][text]` for a
    sequence's first segment, `rest[literal][text]` for the others (the same dicts where no dummy prefix is
    stripped), and `bos[id]` of each BOS id."""

    first: Texts
    rest: Texts
    bos: dict[int, int]
    tokens: np.ndarray  # int32
    starts: np.ndarray  # int64
    lengths: np.ndarray  # int64

    @classmethod
    def build(
        cls,
        rendered: Sequence[Sequence[Segment]],
        tokenizer: PreTrainedTokenizerBase,
        bos: Sequence[int] = (),
    ) -> Vocab:
        """One batched tokenizer call per kind of text (markup, message; and where a dummy prefix is
        stripped, a sequence's first segment apart from the others)."""
        if dummy_prefix_ids(tokenizer) is None:
            groups = [(_distinct(s for segs in rendered for s in segs), False)]
        else:
            first = _distinct(segs[0] for segs in rendered if segs)
            groups = [(first, False), (_distinct(s for segs in rendered for s in segs[1:]), True)]
        pieces: list[list[int]] = []
        entries: list[Texts] = []
        for texts, continuation in groups:
            numbered = []
            for literal in (False, True):
                start = len(pieces)
                pieces += encode_segment_texts(
                    texts[literal], tokenizer, continuation=continuation, literal=literal
                )
                numbered.append(dict(zip(texts[literal], range(start, len(pieces)), strict=True)))
            entries.append((numbered[0], numbered[1]))
        bos_at = dict(zip(bos, range(len(pieces), len(pieces) + len(bos)), strict=True))
        pieces += [[b] for b in bos]
        lengths = np.fromiter(map(len, pieces), np.int64, len(pieces))
        tokens = np.fromiter(itertools.chain.from_iterable(pieces), np.int32, int(lengths.sum()))
        return cls(entries[0], entries[-1], bos_at, tokens, _offsets(lengths)[:-1], lengths)

    def entry(self, seg: Segment, first: bool) -> int:
        return (self.first if first else self.rest)[seg.literal][seg.text]


# Example statuses, in the order of their codes: the first two are kept, the others are drop reasons.
STATUSES = ("kept", "truncated", "too_long", "no_targets", "no_targets_after_truncation")
KEPT, TRUNCATED, TOO_LONG, NO_TARGETS, NO_TARGETS_AFTER_TRUNCATION = range(len(STATUSES))


@dataclass(frozen=True)
class EncodedRows:
    """Encoded examples of a batch of conversations as flat arrays (numpy does the per-token work that a
    Python loop per example spent a twentieth of the tokenizer's time on): example k's tokens are
    `input_ids[offsets[k] : offsets[k + 1]]`, with their `labels` and `status[k]` a code into STATUSES.
    A dropped example has no tokens."""

    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32
    offsets: np.ndarray  # int64, one more than the examples
    status: np.ndarray  # int8

    def __len__(self) -> int:
        return len(self.status)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def kept(self) -> np.ndarray:
        """Which examples are kept (kept or truncated), as a boolean mask."""
        return self.status <= TRUNCATED

    def num_targets(self) -> np.ndarray:
        """Target tokens per example: labels that are not ignored (position 0 never is a target)."""
        rows = np.repeat(np.arange(len(self)), self.lengths)
        return np.bincount(rows[self.labels != IGNORE_INDEX], minlength=len(self))

    def statuses(self) -> Counter:
        return Counter({STATUSES[code]: int(n) for code, n in enumerate(np.bincount(self.status)) if n})

    def fit(self, max_length: int | None, policy: str) -> EncodedRows:
        """Apply `max_length` to the kept examples: keep, truncate from the right, or drop; one left with no
        target is dropped (no_targets, or no_targets_after_truncation where truncation removed them)."""
        lengths, status = self.lengths, self.status.copy()
        live = status <= TRUNCATED
        fitted = lengths.copy()
        if max_length is not None:
            over = live & (lengths > max_length)
            if policy == "drop":
                status[over], fitted[over], live = TOO_LONG, 0, live & ~over
            else:
                status[over], fitted[over] = TRUNCATED, max_length
        inside = _positions(lengths) < np.repeat(fitted, lengths)
        rows = np.repeat(np.arange(len(self)), lengths)
        targets = np.bincount(rows[inside & (self.labels != IGNORE_INDEX)], minlength=len(self))
        empty = live & (targets == 0)
        status[empty] = np.where(status[empty] == TRUNCATED, NO_TARGETS_AFTER_TRUNCATION, NO_TARGETS)
        fitted[empty] = 0
        inside &= np.repeat(fitted > 0, lengths)
        return EncodedRows(self.input_ids[inside], self.labels[inside], _offsets(fitted), status)

    def select(self, mask: np.ndarray) -> EncodedRows:
        """The examples where `mask` is true, in order."""
        tokens = np.repeat(mask, self.lengths)
        return EncodedRows(
            self.input_ids[tokens], self.labels[tokens], _offsets(self.lengths[mask]), self.status[mask]
        )

    def example(self, k: int) -> Encoded:
        start, end = self.offsets[k], self.offsets[k + 1]
        status = STATUSES[self.status[k]]
        return Encoded(self.input_ids[start:end].tolist(), self.labels[start:end].tolist(), status)

    def examples(self) -> list[Encoded]:
        return [self.example(k) for k in range(len(self))]


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _positions(lengths: np.ndarray) -> np.ndarray:
    """Each token's position in its example, for examples of `lengths` laid end to end."""
    starts = _offsets(lengths)[:-1]
    return np.arange(int(lengths.sum())) - np.repeat(starts, lengths)


def assemble(
    rendered: Sequence[Sequence[Segment]], vocab: Vocab, bos_ids: Sequence[int | None]
) -> EncodedRows:
    """Segments -> input ids and labels of every example (no length applied: all kept): its BOS id if any
    (`bos_ids`, one per example, each an entry of `vocab.bos`), then each segment's ids; a trained
    segment's ids are its labels, every other label is IGNORE_INDEX, and so is the label of position 0
    (never predicted; packed, it must not be the previous example's target)."""
    entries: list[int] = []
    trained: list[bool] = []
    counts: list[int] = []
    first, rest = vocab.first, vocab.rest
    for segs, bos in zip(rendered, bos_ids, strict=True):
        if bos is not None:
            entries.append(vocab.bos[bos])
            trained.append(False)
        lookup = first
        for seg in segs:
            entries.append(lookup[seg.literal][seg.text])
            trained.append(seg.train)
            lookup = rest
        counts.append(len(segs) + (bos is not None))
    where = np.array(entries, np.int64)
    sizes = vocab.lengths[where]
    gather = _positions(sizes) + np.repeat(vocab.starts[where], sizes)
    input_ids = vocab.tokens[gather]
    labels = np.where(np.repeat(np.array(trained, bool), sizes), input_ids, np.int32(IGNORE_INDEX))
    example_of = np.repeat(np.arange(len(counts)), counts)
    per_example = np.bincount(example_of, weights=sizes, minlength=len(counts)).astype(np.int64)
    offsets = _offsets(per_example)
    labels[offsets[:-1][per_example > 0]] = IGNORE_INDEX
    return EncodedRows(input_ids, labels, offsets, np.zeros(len(counts), np.int8))


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


def encode_rows(
    conversations: Sequence[Conversation],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    truncation: str = "truncate",
    train_on: str = "all_assistant",
    reasoning: str = "keep_last",
) -> EncodedRows:
    """Render, tokenize (one batched tokenizer call per kind of text) and mask a list of conversations, then
    apply `max_length` (`truncation`: truncate or drop)."""
    template.bind(tokenizer)
    rendered = []
    for k, conv in enumerate(conversations):
        try:
            rendered.append(render(conv, template, tokenizer, train_on, reasoning))
        except DataError as err:
            raise _named(k, conv, err) from None
    bos_id = bos_id_for(template, tokenizer)
    doc_bos_id = document_bos_id(tokenizer) if any(isinstance(c, str) for c in conversations) else None
    bos_ids = [doc_bos_id if isinstance(c, str) else bos_id for c in conversations]
    vocab = Vocab.build(rendered, tokenizer, sorted({b for b in (bos_id, doc_bos_id) if b is not None}))
    return assemble(rendered, vocab, bos_ids).fit(max_length, truncation)


def encode_conversations(
    conversations: Sequence[Conversation],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    **encode_kwargs: Any,
) -> list[Encoded]:
    """`encode_rows` (max_length, truncation, train_on, reasoning), one Encoded per conversation."""
    return encode_rows(conversations, template, tokenizer, **encode_kwargs).examples()


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
    bos = bos_id_for(template, tokenizer)
    vocab = Vocab.build([segs], tokenizer, [] if bos is None else [bos])
    return assemble([segs], vocab, [bos]).input_ids.tolist()


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
        (seg.kind, seg.train, int(vocab.lengths[vocab.entry(seg, k == 0)])) for k, seg in enumerate(segs)
    ]
