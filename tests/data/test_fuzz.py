"""Property-based: arbitrary rows give either a processed example whose invariants hold, or a DataError.

Rows mix the keys of every format with values of any JSON type, unicode (lone surrogates included), nesting
and lengths. Nothing else may happen: no other exception, no example over max_length, no target outside an
assistant turn, no kept example without a target.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftlab.data.formats import to_messages
from sftlab.data.tokenize import IGNORE_INDEX, encode_conversations
from sftlab.errors import DataError

MAX_LENGTH = 48
text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", " ", "\ud800", "a\udfffb", "\ufeffBOM", "line\r\nbreak", "<|im_end|>", "日本語", "{", "0"]
    ),
)
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), text)
json_value = st.recursive(
    scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=8
)
role = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "human", "gpt", "bot"]), json_value)
message = st.fixed_dictionaries({"role": role, "content": st.one_of(text, json_value)})
sharegpt_turn = st.fixed_dictionaries({"from": role, "value": st.one_of(text, json_value)})
row = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=5), json_value)}),
    st.fixed_dictionaries({"conversations": st.one_of(st.lists(sharegpt_turn, max_size=5), json_value)}),
    st.fixed_dictionaries(
        {"instruction": st.one_of(text, json_value), "output": st.one_of(text, json_value)},
        optional={"input": st.one_of(text, json_value)},
    ),
    st.fixed_dictionaries({"prompt": st.one_of(text, json_value), "completion": st.one_of(text, json_value)}),
    st.dictionaries(text, json_value, max_size=4),
    json_value,
)


def _round_trip(tokenizer, text: str) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=row, truncation=st.sampled_from(["truncate", "drop"]))
def test_any_row_is_processed_with_invariants_or_rejected_with_a_data_error(
    row, truncation, tokenizer, chatml
):
    try:
        conversation = to_messages(row, None, "fuzz.jsonl:1")
    except DataError:
        return
    (encoded,) = encode_conversations(
        [conversation], chatml, tokenizer, max_length=MAX_LENGTH, truncation=truncation
    )
    if encoded.dropped:
        assert encoded.input_ids == [] and encoded.status in (
            "too_long",
            "no_targets",
            "no_targets_after_truncation",
        )
        return
    ids, labels = encoded.input_ids, encoded.labels
    assert len(ids) == len(labels) <= MAX_LENGTH
    assert labels[0] == IGNORE_INDEX and any(label != IGNORE_INDEX for label in labels[1:])
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids, strict=True))
    supervised = tokenizer.decode(
        [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX],
        clean_up_tokenization_spaces=False,
    )
    # What the tokenizer itself keeps of each assistant turn (it drops some control characters, e.g. \x16).
    trained_text = "".join(
        _round_trip(tokenizer, m["content"] + "<|im_end|>") for m in conversation if m["role"] == "assistant"
    )
    if encoded.status == "kept":
        assert supervised == trained_text
    else:  # truncated: the supervised text is a prefix of the assistant turns' text
        assert trained_text.startswith(supervised.rstrip("\ufffd"))
