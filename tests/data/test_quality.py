"""Text-quality signals: refusals, repeated n-grams, invisible characters, echoes, instruction kinds."""

from __future__ import annotations

import pytest

from sftlab.data.quality import (
    instruction_kind,
    is_echo,
    is_refusal,
    repeated_ngram_rate,
    suspect_characters,
    words,
)


def test_refusals_are_found_by_phrase_with_either_apostrophe():
    assert is_refusal("I\u2019m sorry, but no.")
    assert is_refusal("As an AI language model I cannot")
    assert not is_refusal("2021-03-05")
    assert not is_refusal("Sorry state of affairs", ["i'm sorry"])


def test_repeated_ngram_rate_counts_repeats_of_earlier_ngrams():
    assert repeated_ngram_rate("a b c a b c a b c", n=3) == pytest.approx(1 - 3 / 7)
    assert repeated_ngram_rate("one two", n=3) == 0.0
    assert repeated_ngram_rate("the cat sat on the mat", n=2) == 0.0


def test_suspect_characters_names_invisible_and_control_code_points_once():
    text = "zero\u200bwidth\x07 bell \u200b again \ufffd\ue000\u202e"
    assert suspect_characters(text) == ["U+200B", "U+0007", "U+FFFD", "U+E000", "U+202E"]
    assert suspect_characters("line\nnext\ttab\r\n, café, 日本, emoji 😀") == []


def test_words_lowercase_and_drop_punctuation():
    assert words("Hello, World! It's 2021-03-05.") == ["hello", "world", "it's", "2021", "03", "05"]


def test_echo_is_a_response_that_repeats_its_prompt():
    assert is_echo("What is the capital of France?", "what is the capital of France")
    assert is_echo("Translate: the red house", "Translate the red house.")
    # quoting the prompt in a longer answer is not an echo, nor is a short answer that the prompt contains
    assert not is_echo("Capital of France?", "The capital of France is Paris, a city on the Seine river.")
    assert not is_echo("Who went home: John went home", "John")
    assert not is_echo("", "anything")


@pytest.mark.parametrize(
    ("prompt", "kind"),
    [
        ("Write a poem about the sea.", "write"),
        ("Please summarize this text", "summarize"),
        ("Can you explain recursion?", "explain"),
        ("Can pigs fly?", "can"),
        ("What is 2+2?", "what"),
        ("  ¿Qué hora es?", "qué"),
        ("!!!", ""),
        ("Please", "please"),
    ],
)
def test_instruction_kind_is_the_leading_verb_or_question_word(prompt, kind):
    assert instruction_kind(prompt) == kind
