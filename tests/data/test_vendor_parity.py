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
from sftlab.data.tokenize import encode_conversations, encode_prompt
from tests.data.test_templates import supervised_runs
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


# ---- tool calls: Mistral v3's [AVAILABLE_TOOLS] / [TOOL_CALLS] / [TOOL_RESULTS] ---------------------------
def weather_tool(name: str = "get_weather", description: str | None = "Current weather of a city") -> dict:
    fn = {
        "name": name,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    if description is not None:
        fn["description"] = description
    return {"type": "function", "function": fn}


def call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def calls(*tool_calls: dict) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": list(tool_calls)}


def result(call_id: str, content: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


PARIS = call("call00001", "get_weather", '{"city": "Paris"}')
TOKYO = call("call00002", "get_weather", '{"city": "東京"}')
# (tools, OpenAI messages): sftlab reads them through the `messages` format reader, the vendor as they are.
MISTRAL_TOOLS = {
    "one_call": (
        [weather_tool()],
        [
            {"role": "user", "content": "Weather in Paris?"},
            calls(PARIS),
            result("call00001", '{"temp_c": 18}'),
            {"role": "assistant", "content": "18 °C in Paris."},
        ],
    ),
    "system_and_tools": (
        [weather_tool(), weather_tool("get_time", None)],
        [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Paris?"},
            calls(PARIS),
            result("call00001", "sunny"),
            {"role": "assistant", "content": "Sunny."},
        ],
    ),
    "parallel_calls": (
        [weather_tool()],
        [
            {"role": "user", "content": "Paris and Tokyo?"},
            calls(PARIS, TOKYO),
            result("call00001", '{"temp_c": 18}'),
            result("call00002", '{"temp_c": 25, "sky": "晴れ"}'),
            {"role": "assistant", "content": "18 and 25."},
        ],
    ),
    "call_is_last_turn": (
        [weather_tool()],
        [
            {
                "role": "user",
                # One text part: mistral-common encodes each part on its own (a dummy-prefix space before
                # every part); sftlab joins the parts' text, as OpenAI and the HF templates read them.
                "content": [{"type": "text", "text": "Tokyo, please"}],
            },
            calls(TOKYO),
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(MISTRAL_TOOLS))
def test_mistral_v3_tool_calls_match_mistral_common(mistral, name):
    from sftlab.data.formats import to_messages

    tools, messages = MISTRAL_TOOLS[name]
    ours = to_messages({"messages": messages, "tools": tools}, "messages", "test:1")
    # The vendor gets the list-of-parts user content as it is.
    _, reference, tpl = mistral
    tokenizer = mistral[0]
    check_against_vendor(
        tpl,
        tokenizer,
        ours,
        mistral_ids(reference, messages, tools),
        lambda i: mistral_ids(reference, messages[: i - 1], tools),  # ours[0] is the tools message
        lambda i: mistral_assistant_ids(reference, messages[i - 1]),
    )


# ---- tool calls: Llama 3.1's JSON calls (Meta's ChatFormat) and schemas (Meta's 3.1 Jinja) ---------------
LLAMA3_TOOLS = {
    "one_call": MISTRAL_TOOLS["one_call"],
    "parallel_calls": MISTRAL_TOOLS["parallel_calls"],
    "two_rounds": (
        [weather_tool(), weather_tool("get_time", None)],
        [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris, then in Tokyo?"},
            calls(PARIS),
            result("call00001", '{"temp_c": 18}'),
            calls(TOKYO),
            result("call00002", "晴れ"),
            {"role": "assistant", "content": "Paris 18 °C, Tokyo sunny."},
        ],
    ),
    "call_is_last_turn": MISTRAL_TOOLS["call_is_last_turn"],
}


def llama31_jinja_first_user(tools: list[dict], content: str) -> str:
    """The text of the first user message as Meta's Llama 3.1 Jinja (TRL's copy) renders it with `tools`."""
    text = vendor.trl_chat_template("llama3_1")
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[[{"role": "user", "content": content}]], tools=tools, chat_template=text
    )
    header = "<|start_header_id|>user<|end_header_id|>\n\n"
    return rendered[0].split(header, 1)[1].split("<|eot_id|>", 1)[0]


def llama_tool_dialog(tools: list[dict], messages: list[dict]):
    """OpenAI messages as Meta's RawMessages: a call turn ends for its result (stop reason end_of_message);
    the first user message is the 3.1 Jinja's (schemas + instruction + content): ChatFormat has no schemas."""
    import json

    from llama_models.datatypes import RawMessage, StopReason, ToolCall

    out, first = [], True
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(part["text"] for part in content)
        if m["role"] == "user" and first:
            content, first = llama31_jinja_first_user(tools, content), False
        if m.get("tool_calls"):
            tool_calls = [
                ToolCall(
                    call_id=c["id"],
                    tool_name=c["function"]["name"],
                    arguments=json.loads(c["function"]["arguments"]),
                )
                for c in m["tool_calls"]
            ]
            out.append(
                RawMessage(
                    role="assistant",
                    content="",
                    tool_calls=tool_calls,
                    stop_reason=StopReason.end_of_message,
                )
            )
        else:
            out.append(RawMessage(role=m["role"], content=content))
    return out


@pytest.mark.parametrize("name", sorted(LLAMA3_TOOLS))
def test_llama3_tool_calls_match_meta_chat_format(llama3, name):
    from llama_models.datatypes import ToolPromptFormat

    from sftlab.data.formats import to_messages

    tokenizer, fmt, tpl = llama3
    tools, messages = LLAMA3_TOOLS[name]
    ours = to_messages({"messages": messages, "tools": tools}, "messages", "test:1")
    raw = llama_tool_dialog(tools, messages)

    def encode(m):
        return fmt.encode_message(m, ToolPromptFormat.json)[0]

    header = len(fmt._encode_header("assistant"))
    check_against_vendor(
        tpl,
        tokenizer,
        ours,
        [fmt.tokenizer.bos_id] + [t for m in raw for t in encode(m)],
        lambda i: fmt.encode_dialog_prompt(raw[: i - 1]).tokens,  # ours[0] is the tools message
        lambda i: encode(raw[i - 1])[header:],
    )


def test_llama3_trains_the_calls_and_answer_never_the_schemas_or_results(llama3):
    from sftlab.data.formats import to_messages

    tokenizer, _, tpl = llama3
    tools, messages = LLAMA3_TOOLS["two_rounds"]
    ours = to_messages({"messages": messages, "tools": tools}, "messages", "test:1")
    ex = encode_conversations([ours], tpl, tokenizer)[0]
    assert [tokenizer.decode(run) for run in supervised_runs(ex.input_ids, ex.labels)] == [
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>',
        '{"type": "function", "name": "get_weather", "parameters": {"city": "\\u6771\\u4eac"}}<|eom_id|>',
        "Paris 18 °C, Tokyo sunny.<|eot_id|>",
    ]
    text = tokenizer.decode(ex.input_ids)
    assert "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please" in text
    assert '"name": "get_time"' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n晴れ<|eot_id|>" in text


def test_llama3_generation_stops_after_a_tool_call_and_gguf_names_eot(llama3):
    from sftlab.export.gguf import eot_token_id
    from sftlab.model.generate import stop_token_ids

    tokenizer, _, tpl = llama3
    eot, eom = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>"])
    assert {eot, eom} <= set(stop_token_ids(tpl, tokenizer))
    assert eot_token_id(tpl, tokenizer) == eot


def test_templates_without_a_tool_format_refuse_tool_calls(qwen):
    from sftlab.data.formats import to_messages
    from sftlab.errors import DataError

    tools, messages = MISTRAL_TOOLS["one_call"]
    ours = to_messages({"messages": messages, "tools": tools}, "messages", "test:1")
    with pytest.raises(DataError, match="template=chatml has no tool format"):
        encode_conversations([ours], template("chatml"), qwen)
    # A plain tool turn (no schemas, no calls) still renders as a role.
    plain = [m for m in ours[1:] if not m.get("tool_calls")]
    assert encode_conversations([plain], template("chatml"), qwen)[0].status == "kept"


def test_tokenizer_template_renders_tools_with_the_models_own_jinja(qwen):
    """template=tokenizer passes the schemas to Qwen2.5's Jinja: they land in the system turn, untrained; the
    tool call (<tool_call> JSON) and the answer are trained with their <|im_end|>; the result is not."""
    from sftlab.data.formats import to_messages
    from sftlab.data.templates import TokenizerTemplate

    tools, messages = MISTRAL_TOOLS["one_call"]
    ours = to_messages({"messages": messages, "tools": tools}, "messages", "test:1")
    tpl = TokenizerTemplate(chat_template=vendor.trl_chat_template("qwen2_5"))
    ex = encode_conversations([ours], tpl, qwen)[0]
    text = qwen.decode(ex.input_ids)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    trained = [qwen.decode(run) for run in supervised_runs(ex.input_ids, ex.labels)]
    assert trained == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "18 °C in Paris.<|im_end|>",
    ]
    assert "<tool_response>\n" + '{"temp_c": 18}' in text
    assert ex.input_ids == qwen.apply_chat_template(
        ours[1:], tools=tools, chat_template=tpl.chat_template, return_dict=False
    )


def test_saved_template_refuses_tools_rather_than_dropping_them(mistral):
    from jinja2.exceptions import TemplateError

    tokenizer, _, tpl = mistral
    tools, messages = MISTRAL_TOOLS["one_call"]
    jinja = tpl.bind(tokenizer).to_jinja()
    with pytest.raises(TemplateError, match="does not render tools"):
        tokenizer.apply_chat_template(messages[:1], tools=tools, chat_template=jinja, tokenize=False)


# ---- reasoning turns: Qwen3's own template, on Qwen's vocabulary ----------------------------------------
def think(reasoning: str, answer: str) -> dict:
    return {"role": A, "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}


QWEN3_REASONING = {
    "single": [{"role": U, "content": "2+2?"}, think("Two plus two is four.", "4")],
    "system": [
        {"role": S, "content": "Think first."},
        {"role": U, "content": "Capital of France?"},
        think("France's capital: Paris.", "Paris."),
    ],
    "multi_turn": [
        {"role": U, "content": "2+2?"},
        think("Add.", "4"),
        {"role": U, "content": "3*3?"},
        think("Multiply:\n3*3 = 9.", "9"),
    ],
    "empty_reasoning": [
        {"role": U, "content": "Hi"},
        {"role": A, "content": "<think>\n\n</think>\n\nHello!"},
    ],
    "unicode_code": [
        {"role": U, "content": "東京?"},
        think("日本の首都。\n\n```py\nx = 1\n```", "東京は日本の首都です。🙂"),
    ],
    "punctuation_ends": [{"role": U, "content": "Why?"}, think("Because... (see above)!", '{"ok": true}')],
}


@pytest.mark.parametrize("name", sorted(QWEN3_REASONING))
def test_chatml_reasoning_matches_qwen3_chat_template(qwen, name):
    """data.reasoning=keep_last (the default) with template=chatml is Qwen3's template: the final answer keeps
    its <think> block (trained), earlier answers lose theirs in training and in every later prompt."""
    from sftlab.data.formats import to_messages
    from sftlab.data.reasoning import split_reasoning

    rows = QWEN3_REASONING[name]
    conversation = to_messages({"messages": rows}, None, "test:1")
    jinja = vendor.trl_chat_template("qwen3")

    def jinja_ids(messages, generation=False):
        return qwen.apply_chat_template(
            messages, chat_template=jinja, add_generation_prompt=generation, return_dict=False
        )

    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    last = max(i for i, m in enumerate(rows) if m["role"] == A)

    def assistant_ids(i):
        text = rows[i]["content"] if i == last else split_reasoning(rows[i]["content"])[1]
        return qwen(text, add_special_tokens=False)["input_ids"] + [im_end]

    check_against_vendor(
        template("chatml"),
        qwen,
        conversation,
        jinja_ids(rows),
        lambda i: jinja_ids(rows[:i], generation=True),
        assistant_ids,
    )


# ---- template=tokenizer with {% generation %} markers: Qwen3's training template as TRL ships it ---------
def test_generation_markers_give_the_mask_and_agree_with_the_prefix_diff(qwen):
    from sftlab.data.formats import to_messages
    from sftlab.data.templates import TokenizerTemplate

    rows = QWEN3_REASONING["multi_turn"]
    tpl = TokenizerTemplate(chat_template=vendor.trl_chat_template("qwen3_training"))
    conversation = to_messages({"messages": rows}, None, "test:1")
    ex = encode_conversations([conversation], tpl, qwen, reasoning="keep_all")[0]
    marked = qwen.apply_chat_template(
        rows, chat_template=tpl.chat_template, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ex.input_ids == marked["input_ids"]
    assert [int(label != -100) for label in ex.labels] == marked["assistant_masks"]
    assert [qwen.decode(run) for run in supervised_runs(ex.input_ids, ex.labels)] == [
        "<think>\nAdd.\n</think>\n\n4<|im_end|>\n",
        "<think>\nMultiply:\n3*3 = 9.\n</think>\n\n9<|im_end|>\n",
    ]


def test_generation_markers_that_disagree_with_the_prefix_diff_name_the_conversation(qwen):
    from sftlab.data.formats import to_messages
    from sftlab.data.templates import TokenizerTemplate
    from sftlab.errors import DataError

    jinja = vendor.trl_chat_template("qwen3_training")
    header = "{{- '<|im_start|>' + message.role + '\\n' }}\n        {%- generation %}"
    assert header in jinja
    # The marked span swallows the assistant header, which the generation prompt already holds.
    wrong = jinja.replace(header, "{%- generation %}\n        {{- '<|im_start|>' + message.role + '\\n' }}")
    conversation = to_messages({"messages": QWEN3_REASONING["single"]}, None, "test:1")
    with pytest.raises(
        DataError, match=r"conversation 0 \(first user message '2\+2\?'\).*turn 1.*generation"
    ):
        encode_conversations([conversation], TokenizerTemplate(chat_template=wrong), qwen)
    # A template that marks no assistant turn at all is refused too, never trained with an empty mask.
    empty = jinja.replace("{%- endgeneration %}", "").replace(
        "{%- generation %}", "{% generation %}{% endgeneration %}"
    )
    with pytest.raises(DataError, match="markers cover 0 span"):
        encode_conversations([conversation], TokenizerTemplate(chat_template=empty), qwen)


def test_qwen3_template_without_markers_is_refused_for_multi_turn_reasoning(qwen):
    """Qwen3's inference template renders the last turn with an (empty) think block and history without:
    no prefix structure for training every turn, so it is refused rather than mis-masked."""
    from sftlab.data.formats import to_messages
    from sftlab.data.templates import TokenizerTemplate
    from sftlab.errors import DataError

    conversation = to_messages({"messages": QWEN3_REASONING["multi_turn"]}, None, "test:1")
    tpl = TokenizerTemplate(chat_template=vendor.trl_chat_template("qwen3"))
    with pytest.raises(DataError, match=r"conversation 0 .*rewrites history"):
        encode_conversations([conversation], tpl, qwen)
