"""sftlab's built-in templates against the model vendors' own encoders, token id for token id.

For each conversation: the training sequence equals the vendor's encoding of the whole conversation, each
inference prompt (`encode_prompt` of the history before an assistant turn) equals the vendor's generation
prompt, and the supervised tokens are exactly the vendor's tokens of each assistant message (its content and
end-of-turn). Tokenizers are the vendors' real vocabularies, built offline (tests/helpers/vendor_tokenizers).
"""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from sftlab import build
from sftlab.data.tokenize import IGNORE_INDEX, encode_conversations, encode_prompt
from tests.helpers import vendor_tokenizers as vendor

U, A, S = "user", "assistant", "system"


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


# Conversations every format carries: one user turn (with and without system), several turns, unicode,
# leading / trailing / inner whitespace, chat markers typed as text, numbers and code.
COMMON = {
    "single": conv((U, "What is the capital of France?"), (A, "Paris.")),
    "system_single": conv((S, "Be brief."), (U, "2+2?"), (A, "4")),
    "multi_turn": conv((U, "Hi"), (A, "Hello! How can I help?"), (U, "Name a colour."), (A, "Blue.")),
    "unicode": conv((U, "東京の天気は？ Ça va? 🙂"), (A, "晴れです。Très bien! 🌞")),
    "leading_spaces": conv((U, "  indented question"), (A, "  indented answer")),
    "inner_newlines": conv((U, "Line one\n\nLine two\n"), (A, "- a\n- b\n\n```py\nx = 1\n```")),
    "markers_as_text": conv(
        (U, "What does [INST] or <|eot_id|> mean?"), (A, "They are [/INST] </s> markers.")
    ),
    "digits": conv((U, "Convert 2024-03-15 to 15/03/2024 style."), (A, "15/03/2024")),
    "three_turns": conv((U, "a"), (A, "b"), (U, "c"), (A, "d"), (U, "e?"), (A, "f!")),
    "json_answer": conv((U, "Reply in JSON."), (A, '{"answer": 42, "ok": true}')),
    "long_words": conv((U, "Supercalifragilistic expialidocious"), (A, "Antidisestablishmentarianism")),
}
# System turns: Llama 3 gives them their own header anywhere; Mistral has none (see MISTRAL below).
LLAMA3_ONLY = {
    "system_multi_turn": conv((S, "You are terse."), (U, "Hi"), (A, "Hi."), (U, "Bye"), (A, "Bye.")),
    "empty_system": conv((S, ""), (U, "Hello"), (A, "Hi there")),
}


def template(name: str):
    return instantiate(build.compose([f"template={name}"]).template, _convert_="all")


def supervised_runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    return runs + ([current] if current else [])


def check_against_vendor(tpl, tokenizer, conversation, full_ids, prompt_ids, assistant_ids) -> None:
    """`full_ids`: vendor ids of the conversation; `prompt_ids(i)`: of the prompt before message i;
    `assistant_ids(i)`: of assistant message i itself (content + end-of-turn)."""
    ex = encode_conversations([conversation], tpl, tokenizer)[0]
    assert ex.status == "kept"
    assert ex.input_ids == full_ids
    turns = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    for i in turns:
        prompt = encode_prompt(conversation[:i], tpl, tokenizer)
        assert prompt == prompt_ids(i)
        assert ex.input_ids[: len(prompt)] == prompt
    assert supervised_runs(ex.input_ids, ex.labels) == [assistant_ids(i) for i in turns]


# ---- Llama 3: Meta's ChatFormat -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama3():
    return vendor.llama3(), vendor.llama3_reference(), template("llama3")


def llama_message(m: dict):
    from llama_models.datatypes import RawMessage

    return RawMessage(role=m["role"], content=m["content"])


@pytest.mark.parametrize("name", sorted({**COMMON, **LLAMA3_ONLY}))
def test_llama3_matches_meta_chat_format(llama3, name):
    from llama_models.datatypes import ToolPromptFormat

    tokenizer, fmt, tpl = llama3
    conversation = {**COMMON, **LLAMA3_ONLY}[name]
    raw = [llama_message(m) for m in conversation]

    def encode(m):
        return fmt.encode_message(m, ToolPromptFormat.json)[0]

    header = len(fmt._encode_header("assistant"))
    full = [fmt.tokenizer.bos_id] + [t for m in raw for t in encode(m)]
    check_against_vendor(
        tpl,
        tokenizer,
        conversation,
        full,
        lambda i: fmt.encode_dialog_prompt(raw[:i]).tokens,
        lambda i: encode(raw[i])[header:],
    )


# ---- Mistral v3: mistral-common ---------------------------------------------------------------------
# Mistral has no system role: mistral-common puts the system message into the LAST user turn, sftlab into
# the first (so that a conversation's earlier turns are never re-rendered: the prompt of turn 1 stays the
# prefix of the whole training sequence). With one user turn the two agree; MISTRAL_SYSTEM_FIRST checks the
# exact merged text on longer conversations against the vendor given the merged first turn.
MISTRAL = {
    **COMMON,
    "empty_system": conv((S, ""), (U, "Hello"), (A, "Hi there")),
    "trailing_spaces": conv((U, "Hello  "), (A, "Hi there  ")),
}


@pytest.fixture(scope="module")
def mistral():
    return vendor.mistral_v3(), vendor.mistral_v3_reference, template("mistral")


def mistral_ids(reference, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest.from_openai(messages, tools=tools)
    return reference(training=messages[-1]["role"] == "assistant").encode_chat_completion(request).tokens


def mistral_assistant_ids(reference, message: dict) -> list[int]:
    from mistral_common.protocol.instruct.messages import AssistantMessage

    return reference(training=True).instruct_tokenizer.encode_assistant_message(
        AssistantMessage.from_openai(message), is_before_last_user_message=False
    )


def check_mistral(mistral, conversation, reference_conversation=None, tools=None) -> None:
    tokenizer, reference, tpl = mistral
    ref_conv = reference_conversation or conversation
    offset = len(ref_conv) - len(conversation)
    check_against_vendor(
        tpl,
        tokenizer,
        conversation,
        mistral_ids(reference, ref_conv, tools),
        lambda i: mistral_ids(reference, ref_conv[: i + offset], tools),
        lambda i: mistral_assistant_ids(reference, conversation[i]),
    )


@pytest.mark.parametrize("name", sorted(MISTRAL))
def test_mistral_v3_matches_mistral_common(mistral, name):
    check_mistral(mistral, MISTRAL[name])


def test_mistral_v3_system_goes_into_the_first_user_turn(mistral):
    conversation = conv((S, "You are terse."), (U, "Hi"), (A, "Hi."), (U, "Bye"), (A, "Bye."))
    merged = conv((U, "You are terse.\n\nHi"), (A, "Hi."), (U, "Bye"), (A, "Bye."))
    check_mistral(mistral, conversation, reference_conversation=merged)


# ---- serving stacks: the saved Jinja template, rendered and tokenized as one string ----------------------
# Whole-string tokenization parses chat markers typed in the content as control tokens (the vendors' encoders
# and sftlab's training do not), so that conversation is left out here.
@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_saved_template_tokenizes_to_the_training_tokens_with_the_real_tokenizer(family, llama3, mistral):
    tokenizer, _, tpl = {"llama3": llama3, "mistral": mistral}[family]
    conversations = {**COMMON, **(LLAMA3_ONLY if family == "llama3" else MISTRAL)}
    tpl.bind(tokenizer)
    jinja = tpl.to_jinja()
    for name, conversation in sorted(conversations.items()):
        if name == "markers_as_text":
            continue
        ex = encode_conversations([conversation], tpl, tokenizer)[0]
        served = tokenizer.apply_chat_template(conversation, chat_template=jinja, return_dict=False)
        assert served == ex.input_ids, name
        for i in [i for i, m in enumerate(conversation) if m["role"] == "assistant"]:
            prompt = tokenizer.apply_chat_template(
                conversation[:i], chat_template=jinja, add_generation_prompt=True, return_dict=False
            )
            assert prompt == encode_prompt(conversation[:i], tpl, tokenizer), (name, i)


# ---- Qwen: ChatML with Qwen's real vocabulary, against Qwen's own Jinja template ------------------------
@pytest.fixture(scope="module")
def qwen():
    return vendor.qwen3()


def test_converted_qwen_vocabulary_matches_qwen_tiktoken(qwen):
    reference = vendor.qwen_reference()
    for text in sorted(
        {m["content"] for c in COMMON.values() for m in c} - {COMMON["markers_as_text"][0]["content"]}
    ):
        assert qwen(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text


@pytest.mark.parametrize("name", sorted(COMMON))
def test_chatml_matches_qwen2_5_chat_template(qwen, name):
    """Qwen2.5's template adds its own system message when there is none: give one, as sftlab's chatml
    (no default system) then renders the same conversation."""
    conversation = [{"role": "system", "content": "You are a helpful assistant."}, *COMMON[name]]
    jinja = vendor.trl_chat_template("qwen2_5")
    tpl = template("chatml")

    def jinja_ids(messages, generation=False):
        return qwen.apply_chat_template(
            messages, chat_template=jinja, add_generation_prompt=generation, return_dict=False
        )

    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    if name == "markers_as_text":  # whole-string tokenization would parse the typed markers
        pytest.skip("Qwen's markers typed as text are special in a whole-string tokenization")
    check_against_vendor(
        tpl,
        qwen,
        conversation,
        jinja_ids(conversation),
        lambda i: jinja_ids(conversation[:i], generation=True),
        lambda i: qwen(conversation[i]["content"], add_special_tokens=False)["input_ids"] + [im_end],
    )
