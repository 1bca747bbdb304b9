"""Sentencepiece-style (Metaspace) tokenizers: per-segment tokenization without stray dummy-prefix spaces.

No real Mistral / Llama-2 / Gemma tokenizer is available offline, so a small BPE tokenizer with the same
`Metaspace(prepend_scheme="first")` pre-tokenizer and a BOS-adding post-processor is trained in the test.
"""

from __future__ import annotations

import numpy as np
import pytest
from hydra.utils import instantiate
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from sftlab import build
from sftlab.data.tokenize import (
    IGNORE_INDEX,
    STATUSES,
    EncodedRows,
    dummy_prefix_ids,
    encode_conversations,
    encode_prompt,
    encode_segment_texts,
)

SPECIAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
CONVERSATION = [
    {"role": "system", "content": "Be brief"},
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "four"},
    {"role": "tool", "content": "the capital is Paris"},
    {"role": "user", "content": "the capital of France"},
    {"role": "assistant", "content": "Paris"},
]


@pytest.fixture(scope="module")
def metaspace():
    corpus = [
        "hello world how are you",
        "the capital of France is Paris",
        "what is two plus two",
        "four",
        "Be brief and kind",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIAL, initial_alphabet=list("\n?.,!"))
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def mistral():
    return instantiate(build.compose(["template=mistral"]).template, _convert_="all")


def test_detects_the_dummy_prefix(metaspace, tokenizer):
    assert dummy_prefix_ids(metaspace) is not None
    assert dummy_prefix_ids(tokenizer) is None  # SmolLM2: byte-level BPE, nothing to strip


def test_mistral_tokens_equal_whole_string_tokenization_with_one_bos(metaspace, mistral):
    ex = encode_conversations([CONVERSATION], mistral, metaspace)[0]
    mistral.bind(metaspace)
    text = metaspace.apply_chat_template(CONVERSATION, chat_template=mistral.to_jinja(), tokenize=False)
    assert text.startswith("<s>[INST] Be brief\n\nwhat")
    # The tokenizer's own post-processor adds BOS once; the template's rendered "<s>" is that same BOS.
    assert ex.input_ids == metaspace(text[len("<s>") :])["input_ids"]
    assert ex.input_ids.count(metaspace.bos_token_id) == 1 and ex.input_ids[0] == metaspace.bos_token_id
    trained = [
        metaspace.convert_ids_to_tokens([t])[0]
        for t, lab in zip(ex.input_ids, ex.labels, strict=True)
        if lab != IGNORE_INDEX
    ]
    assert trained == ["▁four", "</s>", "▁Paris", "</s>"]


def test_generation_prompt_is_a_token_prefix(metaspace, mistral):
    ex = encode_conversations([CONVERSATION], mistral, metaspace)[0]
    for i in (2, 5):
        prompt = encode_prompt(CONVERSATION[:i], mistral, metaspace)
        assert ex.input_ids[: len(prompt)] == prompt and ex.labels[len(prompt)] != IGNORE_INDEX


def test_without_the_handling_a_segment_gets_a_stray_space(metaspace):
    # "four" continuing e.g. "...two" inside a string is "four"; tokenized alone it would become "▁four".
    plain = metaspace.convert_ids_to_tokens(encode_segment_texts(["four"], metaspace)[0])
    handled = metaspace.convert_ids_to_tokens(encode_segment_texts(["four"], metaspace, continuation=True)[0])
    assert plain == ["▁four"]
    assert "".join(handled) == "four"
    # A segment that starts with its own space keeps exactly one.
    (spaced,) = encode_segment_texts([" four</s>"], metaspace, continuation=True)
    assert metaspace.convert_ids_to_tokens(spaced) == ["▁four", "</s>"]


def test_plain_text_document_gets_the_tokenizers_own_bos_once(metaspace, mistral, tokenizer, chatml):
    ex = encode_conversations(["the capital of France is Paris"], mistral, metaspace)[0]
    assert ex.input_ids == metaspace("the capital of France is Paris")["input_ids"] + [metaspace.eos_token_id]
    assert ex.labels[0] == IGNORE_INDEX and ex.labels[1:] == ex.input_ids[1:]
    smol = encode_conversations(["plain text"], chatml, tokenizer)[0]  # SmolLM2 adds no BOS of its own
    assert smol.input_ids == tokenizer("plain text")["input_ids"] + [tokenizer.eos_token_id]


def _rows(*examples: tuple[list[int], list[int]]) -> EncodedRows:
    lengths = np.array([len(ids) for ids, _ in examples])
    return EncodedRows(
        np.array([t for ids, _ in examples for t in ids], np.int32),
        np.array([t for _, labels in examples for t in labels], np.int32),
        np.concatenate([[0], np.cumsum(lengths)]),
        np.zeros(len(examples), np.int8),
    )


def test_fit_truncates_or_drops_and_a_later_fit_keeps_earlier_drop_reasons():
    x = IGNORE_INDEX
    rows = _rows(
        ([1, 2, 3, 4, 5], [x, x, 3, 4, 5]),  # targets at the end
        ([1, 2, 3], [x, 2, 3]),
        ([1, 2, 3, 4], [x, x, x, x]),  # nothing to train on
        ([1, 2, 3, 4, 5, 6], [x, x, x, x, 5, 6]),  # targets only past max_length
    )
    truncated = rows.fit(4, "truncate")
    assert [e.status for e in truncated.examples()] == [
        "truncated", "kept", "no_targets", "no_targets_after_truncation",
    ]  # fmt: skip
    assert [(e.input_ids, e.labels) for e in truncated.examples()] == [
        ([1, 2, 3, 4], [x, x, 3, 4]), ([1, 2, 3], [x, 2, 3]), ([], []), ([], []),
    ]  # fmt: skip
    assert truncated.num_targets().tolist() == [2, 2, 0, 0] and truncated.kept.tolist() == [1, 1, 0, 0]
    assert [STATUSES[s] for s in rows.fit(4, "drop").status] == ["too_long", "kept", "no_targets", "too_long"]
    again = truncated.fit(2, "drop")  # what was dropped stays dropped for its first reason
    assert [STATUSES[s] for s in again.status] == [
        "too_long", "too_long", "no_targets", "no_targets_after_truncation",
    ]  # fmt: skip
    assert again.statuses() == {"too_long": 2, "no_targets": 1, "no_targets_after_truncation": 1}
    kept = truncated.select(truncated.kept)
    assert [(e.input_ids, e.status) for e in kept.examples()] == [
        ([1, 2, 3, 4], "truncated"),
        ([1, 2, 3], "kept"),
    ]


def test_a_padded_or_truncated_call_before_changes_no_example(chatml, tokenizer):
    """The transformers wrapper leaves padding and truncation set on the Rust tokenizer after a call;
    segments are encoded by the Rust tokenizer directly, so they must not be padded or cut by them."""
    conv = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}]
    want = encode_conversations([conv], chatml, tokenizer)
    tokenizer(["a", "a much longer text than the first one"], padding=True, truncation=True, max_length=3)
    assert encode_conversations([conv], chatml, tokenizer) == want
    prompt = encode_prompt(conv[:1], chatml, tokenizer)
    assert prompt == want[0].input_ids[: len(prompt)] and len(prompt) > 3
