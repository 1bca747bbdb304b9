"""The Modelfile's Go TEMPLATE, rendered with Go-template semantics, reproduces the training prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sftlab.errors import ConfigError
from sftlab.export.ollama import go_template, modelfile
from tests.helpers.gotemplate import render

CONF = Path(__file__).resolve().parents[2] / "conf" / "template"
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Convert the 5th of March, 2021 to ISO 8601 {{ .Role }}"},
    {"role": "assistant", "content": "2021-03-05"},
    {"role": "user", "content": "And 2 + 2?"},
]


def load(name: str):
    template = instantiate(OmegaConf.load(CONF / f"{name}.yaml"), _convert_="all")
    template.special = {"bos_token": "<s>", "eos_token": "</s>", "use_bos": False}  # as bind() fills them
    return template


def ollama_render(template, messages) -> str:
    """What Ollama feeds the model: the Modelfile's SYSTEM is the first message when a request has none."""
    if template.default_system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": template.default_system}, *messages]
    dot = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return render(go_template(template), dot)


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "gemma", "alpaca"])
@pytest.mark.parametrize("with_system", [True, False])
def test_template_renders_the_training_prompt_of_a_two_turn_conversation(name, with_system):
    template = load(name)
    messages = TWO_TURNS if with_system else TWO_TURNS[1:]
    training = "".join(s.text for s in template.generation_prompt(messages))
    assert ollama_render(template, messages) == training


def test_chatml_template_text_and_modelfile():
    template = load("chatml")
    assert ollama_render(template, TWO_TURNS[1:2]) == (
        "<|im_start|>user\nConvert the 5th of March, 2021 to ISO 8601 {{ .Role }}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    text = modelfile("run.q8_0.gguf", template, ["<|im_end|>", "<|im_end|>"])
    lines = text.splitlines()
    assert lines[0] == "FROM ./run.q8_0.gguf"
    assert lines[-1] == 'PARAMETER stop "<|im_end|>"' and text.count("PARAMETER stop") == 1
    assert f'TEMPLATE """{go_template(template)}"""' in text


def test_mistral_carries_the_system_text_into_the_first_user_turn():
    out = ollama_render(load("mistral"), TWO_TURNS)
    assert out.startswith("[INST] Be brief.\n\nConvert the 5th") and out.count("Be brief.") == 1


def test_default_system_becomes_ollamas_system_line():
    template = load("chatml")
    template.default_system = "You are helpful."
    assert 'SYSTEM """You are helpful."""' in modelfile("m.gguf", template, [])
    assert "<|im_start|>system\nYou are helpful.<|im_end|>" in ollama_render(template, TWO_TURNS[1:])


def test_tokenizer_templates_are_refused_with_a_reason():
    class TokenizerTemplate:  # template=tokenizer has no role strings to translate
        pass

    with pytest.raises(ConfigError, match="template=tokenizer"):
        go_template(TokenizerTemplate())


def test_go_template_evaluator_follows_go_semantics():
    """The evaluator itself, on cases whose Go output is known (text/template documentation)."""
    assert render("a  {{- .X -}}  b", {"X": "x"}) == "axb"
    assert render("{{ range .L }}[{{ . }}]{{ else }}none{{ end }}", {"L": []}) == "none"
    assert render('{{ $v := "" }}{{ range .L }}{{ $v = . }}{{ end }}{{ $v }}', {"L": ["p", "q"]}) == "q"
    assert render('{{ if eq .R "a" }}A{{ else if eq .R "b" }}B{{ else }}C{{ end }}', {"R": "b"}) == "B"
    assert render("{{ if .S }}yes{{ else }}no{{ end }}", {"S": ""}) == "no"
