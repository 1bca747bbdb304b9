"""Reasoning turns: parsing, the keep_last / keep_all / drop policies, and what is trained (SmolLM2's
tokenizer, template=chatml). Parity with Qwen3's own template is in test_vendor_parity.py."""

from __future__ import annotations

import pytest

from sftlab.data.formats import BadRow, to_messages
from sftlab.data.reasoning import apply_reasoning, split_reasoning, strip_reasoning
from sftlab.data.tokenize import encode_conversations, encode_prompt, token_spans
from tests.data.test_templates import supervised_runs


@pytest.mark.parametrize(
    ("text", "reasoning", "answer"),
    [
        ("<think>\nAdd them.\n</think>\n\n4", "Add them.", "4"),
        ("<think>a\n\nb</think>4", "a\n\nb", "4"),
        ("<think>\n\n</think>\n\n4", "", "4"),
        ("Add them.\n</think>\n\n4", "Add them.", "4"),  # the prompt opened <think> (DeepSeek-R1)
        ("<think>\nStill thinking", "Still thinking", ""),  # cut off by max_new_tokens
        ("4", None, "4"),
        ("Use <think> tags", None, "Use <think> tags"),
    ],
)
def test_split_reasoning(text, reasoning, answer):
    assert split_reasoning(text) == (reasoning, answer)
    assert strip_reasoning(text) == answer


AGENT = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "reasoning_content": "Easy.", "content": "4"},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "reasoning_content": "Need a tool.", "content": "Looking."},
    {"role": "tool", "content": "18 C"},
    {"role": "assistant", "reasoning_content": "Got it.", "content": "18 C."},
]


def test_policies_keep_reasoning_after_the_last_user_message_all_or_none():
    def kept(policy):
        return [
            m.get("reasoning_content") for m in apply_reasoning(AGENT, policy) if m["role"] == "assistant"
        ]

    assert kept("keep_last") == [None, "Need a tool.", "Got it."]
    assert kept("keep_all") == ["Easy.", "Need a tool.", "Got it."]
    assert kept("drop") == [None, None, None]
    assert AGENT[1]["reasoning_content"] == "Easy."  # the input is not changed


def test_readers_take_think_tags_or_a_reasoning_field():
    def read(assistant: dict):
        return to_messages({"messages": [{"role": "user", "content": "q"}, assistant]}, None, "f.jsonl:3")[1]

    expected = {"role": "assistant", "reasoning_content": "Add.", "content": "4"}
    assert read({"role": "assistant", "content": "<think>\nAdd.\n</think>\n\n4"}) == expected
    assert read({"role": "assistant", "reasoning_content": "\nAdd.\n", "content": "4"}) == expected
    assert read({"role": "assistant", "thinking": "Add.", "content": "4"}) == expected
    assert read({"role": "assistant", "content": "4"}) == {"role": "assistant", "content": "4"}
    # thought, but no answer text (e.g. the answer is a tool call that follows)
    assert read({"role": "assistant", "reasoning_content": "Hm.", "content": None})["content"] == ""
    sharegpt = {
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<think>Add.</think>4"}]
    }
    assert to_messages(sharegpt, None, "f:1")[1] == expected
    with pytest.raises(BadRow, match=r"f.jsonl:3: message 1 \(assistant\) has its reasoning twice"):
        read({"role": "assistant", "reasoning_content": "Add.", "content": "<think>x</think>4"})


@pytest.mark.parametrize(
    ("policy", "trained"),
    [
        ("keep_last", ["4<|im_end|>", "<think>\nSix.\n</think>\n\n6<|im_end|>"]),
        ("keep_all", ["<think>\nFour.\n</think>\n\n4<|im_end|>", "<think>\nSix.\n</think>\n\n6<|im_end|>"]),
        ("drop", ["4<|im_end|>", "6<|im_end|>"]),
    ],
)
def test_kept_reasoning_is_trained_and_prompts_are_prefixes(policy, trained, tokenizer, chatml):
    conv = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "Four.", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "reasoning_content": "Six.", "content": "6"},
    ]
    ex = encode_conversations([conv], chatml, tokenizer, reasoning=policy)[0]
    assert [tokenizer.decode(r) for r in supervised_runs(ex.input_ids, ex.labels)] == trained
    for i in (1, 3):  # the inference prompt of every turn is the training prefix
        prompt = encode_prompt(conv[:i], chatml, tokenizer, reasoning=policy)
        assert ex.input_ids[: len(prompt)] == prompt
        assert ex.labels[len(prompt)] != -100 and ex.labels[len(prompt) - 1] == -100


def test_token_spans_name_reasoning_and_sum_to_the_example(tokenizer, chatml):
    conv = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "Four.", "content": "4"},
    ]
    spans = token_spans(conv, chatml, tokenizer)
    ex = encode_conversations([conv], chatml, tokenizer)[0]
    assert sum(n for _, _, n in spans) == len(ex.input_ids)
    reasoning = [(k, t, n) for k, t, n in spans if k == "reasoning"]
    assert [t for _, t, _ in reasoning] == [True, True, True]
    n = sum(n for *_, n in reasoning)
    start = sum(n for _, _, n in spans[: spans.index(reasoning[0])])
    assert tokenizer.decode(ex.input_ids[start : start + n]) == "<think>\nFour.\n</think>\n\n"


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
def test_answer_stream_holds_back_reasoning_in_any_chunking(chunk):
    from sftlab.data.reasoning import AnswerStream

    def stream(text):
        s = AnswerStream()
        shown = "".join(s.feed(text[i : i + chunk]) for i in range(0, len(text), chunk)) + s.close()
        return shown, s.reasoning

    assert stream("<think>\nHmm: 2+2.\n</think>\n\nIt is 4.") == ("It is 4.", "Hmm: 2+2.")
    assert stream("It is 4. <think> is a tag.") == ("It is 4. <think> is a tag.", None)
    assert stream("<thi") == ("<thi", None)  # ended before it could be a tag: shown as written
    assert stream("<think>\nStill going") == ("", "Still going")  # cut off while reasoning


def test_saved_template_drops_reasoning_from_history_as_training_does(tokenizer, chatml):
    """A client that sends an earlier answer with its <think> block inline gets the prompt training used."""
    raw = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nFour.\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
    ]
    jinja = chatml.bind(tokenizer).to_jinja()
    served = tokenizer.apply_chat_template(
        raw, chat_template=jinja, add_generation_prompt=True, tokenize=False
    )
    canonical = to_messages({"messages": [*raw, {"role": "assistant", "content": "6"}]}, None, "t:1")[:-1]
    assert served == tokenizer.decode(encode_prompt(canonical, chatml, tokenizer))
    # sftlab-serve / chat prompts: the inline block is parsed, then dropped from history the same way
    assert encode_prompt(raw, chatml, tokenizer) == encode_prompt(canonical, chatml, tokenizer)
    assert "Four." not in served
