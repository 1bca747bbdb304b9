"""Correctness guarantees of every chat template, with the real SmolLM2 tokenizer.

For each template, on a multi-turn conversation with a system message and a tool turn:
  * the inference prompt (`encode_prompt`) is exactly the token prefix of the training example and the first
    supervised token is the first response token;
  * the decoded supervised tokens are exactly the assistant contents plus their end-of-turn marker;
  * system, user and tool content is never supervised, BOS appears exactly as often as the saved Jinja
    template (`to_jinja`) renders it, and `apply_chat_template` with that template renders the same text.
"""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from sftlab import build
from sftlab.data.templates import TokenizerTemplate
from sftlab.data.tokenize import IGNORE_INDEX, encode_conversations, encode_prompt
from sftlab.errors import DataError

TEMPLATES = ["chatml", "llama3", "mistral", "gemma", "alpaca", "tokenizer"]
# (text the model generates before the content, end-of-turn text after it) per template
TURN_ENDS = {
    "chatml": ("", "<|im_end|>"),
    "llama3": ("", "<|eot_id|>"),
    "mistral": (" ", "</s>"),
    "gemma": ("", "<end_of_turn>"),
    "alpaca": ("", "<|im_end|>"),
    "tokenizer": ("", "<|im_end|>"),
}

CONVERSATION = [
    {"role": "system", "content": "You answer with tools when needed."},
    {"role": "user", "content": "What's the weather in Paris? Answer: "},
    {"role": "assistant", "content": '{"tool": "weather", "city": "Paris"}'},
    {"role": "tool", "content": '{"temp_c": 18}'},
    {"role": "assistant", "content": "18 degrees and sunny."},
    {"role": "user", "content": "And in Tokyo [in Japanese]"},
    {"role": "assistant", "content": "東京は20度です。"},
]


@pytest.fixture(scope="module", params=TEMPLATES)
def template(request):
    cfg = build.compose(["model=tiny_random", f"template={request.param}"])
    return instantiate(cfg.template, _convert_="all")


def supervised_runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    return runs + ([current] if current else [])


def assistant_turns(conversation):
    return [i for i, m in enumerate(conversation) if m["role"] == "assistant"]


def test_supervised_tokens_are_exactly_assistant_contents_and_turn_ends(template, tokenizer):
    ex = encode_conversations([CONVERSATION], template, tokenizer)[0]
    lead, end = TURN_ENDS[template.name]
    decoded = [tokenizer.decode(run) for run in supervised_runs(ex.input_ids, ex.labels)]
    assert decoded == [lead + CONVERSATION[i]["content"] + end for i in assistant_turns(CONVERSATION)]


def test_generation_prompt_is_token_prefix_and_first_target_is_first_response_token(template, tokenizer):
    ex = encode_conversations([CONVERSATION], template, tokenizer)[0]
    for i in assistant_turns(CONVERSATION):
        prompt = encode_prompt(CONVERSATION[:i], template, tokenizer)
        assert ex.input_ids[: len(prompt)] == prompt
        assert ex.labels[len(prompt) - 1] == IGNORE_INDEX
        assert ex.labels[len(prompt)] == ex.input_ids[len(prompt)]
        lead, _ = TURN_ENDS[template.name]
        # The response starts at the first target (a CJK first token may be a partial byte: compare text).
        assert tokenizer.decode(ex.input_ids[len(prompt) :]).startswith(lead + CONVERSATION[i]["content"])


def test_saved_jinja_template_renders_training_text_and_generation_prompt(template, tokenizer):
    template.bind(tokenizer)
    jinja = template.to_jinja()
    bos = tokenizer.bos_token if template.uses_bos() else ""
    rendered = tokenizer.apply_chat_template(CONVERSATION, chat_template=jinja, tokenize=False)
    assert rendered == bos + "".join(s.text for s in template.render(CONVERSATION))
    for i in assistant_turns(CONVERSATION):
        history = CONVERSATION[:i]
        prompt = tokenizer.apply_chat_template(
            history, chat_template=jinja, tokenize=False, add_generation_prompt=True
        )
        assert prompt == bos + "".join(s.text for s in template.generation_prompt(history))


def test_exactly_one_bos_where_the_template_uses_one(template, tokenizer):
    ex = encode_conversations([CONVERSATION], template, tokenizer)[0]
    template.bind(tokenizer)
    jinja = template.to_jinja()
    jinja_text = tokenizer.apply_chat_template(CONVERSATION, chat_template=jinja, tokenize=False)
    bos = tokenizer.bos_token_id
    # As many BOS ids as the serving template renders (SmolLM2's BOS is ChatML's <|im_start|>), no more.
    assert ex.input_ids.count(bos) == tokenizer(jinja_text, add_special_tokens=False)["input_ids"].count(bos)
    if template.uses_bos():
        assert ex.input_ids[0] == bos and ex.input_ids[1] != bos


# Templates whose markers are special tokens in SmolLM2's vocabulary. Elsewhere its markers are plain text
# that merges with neighbouring content; llama3 and mistral are checked with their vendors' real tokenizers
# (test_vendor_parity.py).
SMOLLM2_NATIVE = ["chatml", "alpaca", "tokenizer"]


@pytest.mark.parametrize("name", SMOLLM2_NATIVE)
def test_serving_stack_tokenizes_the_saved_template_to_the_training_tokens(name, tokenizer):
    """vLLM / transformers render `to_jinja()` and tokenize the whole string: the same tokens as training."""
    template = instantiate(build.compose(["model=tiny_random", f"template={name}"]).template, _convert_="all")
    conv = CONVERSATION
    if template.name == "alpaca":  # plain text: content ending in whitespace merges with the next "\n"
        conv = [dict(m, content=m["content"].rstrip()) for m in CONVERSATION]
    template.bind(tokenizer)
    jinja = template.to_jinja()
    ex = encode_conversations([conv], template, tokenizer)[0]
    assert ex.input_ids == tokenizer.apply_chat_template(conv, chat_template=jinja, return_dict=False)
    for i in assistant_turns(conv):
        served = tokenizer.apply_chat_template(
            conv[:i], chat_template=jinja, add_generation_prompt=True, return_dict=False
        )
        assert served == encode_prompt(conv[:i], template, tokenizer) == ex.input_ids[: len(served)]


ADVERSARIAL_PROMPTS = ["Fill in: ", "Key:", "Options [a, b]"]
ADVERSARIAL_RESPONSES = ['{"a": 1}', "42 is the answer", "東京です", " leading space"]


@pytest.mark.parametrize("prompt", ADVERSARIAL_PROMPTS)
@pytest.mark.parametrize("response", ADVERSARIAL_RESPONSES)
def test_adversarial_boundaries(template, tokenizer, prompt, response):
    conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    ex = encode_conversations([conv], template, tokenizer)[0]
    ids = encode_prompt(conv[:1], template, tokenizer)
    assert ex.input_ids[: len(ids)] == ids
    lead, end = TURN_ENDS[template.name]
    assert [tokenizer.decode(r) for r in supervised_runs(ex.input_ids, ex.labels)] == [lead + response + end]
    assert supervised_runs(ex.input_ids, ex.labels)[0][0] == ex.input_ids[len(ids)]


def test_end_of_turn_token_is_trained_although_pad_is_eos(tokenizer, chatml):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    ex = encode_conversations([CONVERSATION], chatml, tokenizer)[0]
    runs = supervised_runs(ex.input_ids, ex.labels)
    assert [run[-1] for run in runs] == [tokenizer.eos_token_id] * 3


def test_train_on_last_assistant_and_all(template, tokenizer):
    last = encode_conversations([CONVERSATION], template, tokenizer, train_on="last_assistant")[0]
    lead, end = TURN_ENDS[template.name]
    assert [tokenizer.decode(r) for r in supervised_runs(last.input_ids, last.labels)] == [
        lead + CONVERSATION[-1]["content"] + end
    ]
    everything = encode_conversations([CONVERSATION], template, tokenizer, train_on="all")[0]
    assert everything.labels[0] == IGNORE_INDEX  # never predicted
    assert everything.labels[1:] == everything.input_ids[1:]


def test_tokenizer_template_refuses_a_template_that_rewrites_history(tokenizer):
    reverse = (
        "{% for m in messages|reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match="does not extend the earlier turns"):
        TokenizerTemplate(chat_template=reverse).bind(tokenizer).render(CONVERSATION)


def test_placeholder_needs_bind(tokenizer):
    alpaca = instantiate(build.compose(["template=alpaca"]).template, _convert_="all")
    with pytest.raises(RuntimeError, match="bind"):
        alpaca.render(CONVERSATION)
    assert alpaca.bind(tokenizer).render(CONVERSATION)[-1].text == "\n"
    assert not alpaca.uses_bos()  # SmolLM2's tokenizer adds no BOS of its own


def test_llama3_renders_tools_in_the_first_user_turn_and_ends_a_call_with_eom():
    """The schemas open the first user message (after its header), untrained; the calls and their
    <|eom_id|> are trained; the result sits under the ipython header, untrained."""
    from sftlab.data.formats import to_messages
    from sftlab.data.tools import LLAMA3_TOOLS_INSTRUCTION

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    call = {"function": {"name": "f", "arguments": "{}"}}
    rows = [
        {"role": "user", "content": "Go"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "Done"},
    ]
    conversation = to_messages({"messages": rows, "tools": [tool]}, "messages", "test:1")
    tpl = instantiate(build.compose(["template=llama3"]).template, _convert_="all")
    segments = [(s.text, s.train, s.kind) for s in tpl.render(conversation)]
    schema = (
        LLAMA3_TOOLS_INSTRUCTION + '{\n    "type": "function",\n    "function": {\n        "name": "f",\n'
        '        "parameters": {\n            "type": "object"\n        }\n    }\n}\n\n'
    )
    assert segments == [
        ("<|start_header_id|>user<|end_header_id|>\n\n", False, "text"),
        (schema, False, "tools"),
        ("Go", False, "text"),
        ("<|eot_id|>", False, "text"),
        ("<|start_header_id|>assistant<|end_header_id|>\n\n", False, "text"),
        ('{"type": "function", "name": "f", "parameters": {}}', True, "tool_call"),
        ("<|eom_id|>", True, "text"),
        ("<|start_header_id|>ipython<|end_header_id|>\n\n", False, "tool_result"),
        ("ok", False, "tool_result"),
        ("<|eot_id|>", False, "tool_result"),
        ("<|start_header_id|>assistant<|end_header_id|>\n\n", False, "text"),
        ("Done", True, "text"),
        ("<|eot_id|>", True, "text"),
    ]


PLAIN_CONVERSATIONS = [
    CONVERSATION,
    CONVERSATION[1:],  # no system message: templates with a default one add it
    [{"role": "system", "content": ""}, *CONVERSATION[1:3]],  # an empty system merges as nothing
    [{"role": "user", "content": "Hi  "}, {"role": "assistant", "content": "Hello there.  "}],  # rstrip
    [{"role": "assistant", "content": "An answer first."}, {"role": "user", "content": "Then a question"}],
]


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant", "all", "none"])
def test_plain_rendering_gives_the_general_renderings_segments(template, tokenizer, train_on):
    """Conversations without tools or reasoning take `_render_plain`; it must cut, flag and kind every
    segment exactly as the general `_render` does, for every template and training policy."""
    if isinstance(template, TokenizerTemplate):
        pytest.skip("a Jinja template renders through the tokenizer")
    template.bind(tokenizer)
    for conversation in PLAIN_CONVERSATIONS:
        assert template.render(conversation, train_on) == template._render(conversation, train_on)
    # the plain path is the one taken (it shares its markup segments between renderings)
    twice = [template.render(PLAIN_CONVERSATIONS[3], train_on) for _ in range(2)]
    assert any(a is b for a, b in zip(*twice, strict=True))
