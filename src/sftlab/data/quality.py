"""Text-quality signals shared by the data audit, synthetic-data filters and the eval error analysis.

Pure functions over strings: refusal phrases, repeated n-grams, invisible or control characters, a response
that echoes its prompt, and the "kind" of an instruction (its leading verb or question word, the breakdown
the Self-Instruct paper uses to judge diversity).
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

REFUSAL_PHRASES = [
    "i'm sorry",
    "i am sorry",
    "i apologize",
    "i cannot",
    "i can't",
    "i can not",
    "i won't",
    "i will not",
    "i'm unable",
    "i am unable",
    "i'm not able",
    "i am not able",
    "as an ai",
    "as a language model",
    "cannot assist",
    "can't assist",
    "cannot help with",
    "can't help with",
    "not able to provide",
]

# Layout characters are text; everything else in these categories is invisible or not text at all:
# Cc control, Cf format (zero-width space, BOM, bidi overrides, soft hyphen), Co private use, Cs surrogate,
# Cn unassigned. U+FFFD marks bytes that failed to decode somewhere upstream.
ALLOWED_CONTROLS = frozenset("\n\t\r")
SUSPECT_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn"})
REPLACEMENT_CHAR = "\ufffd"
_LAYOUT = str.maketrans(dict.fromkeys(ALLOWED_CONTROLS, " "))

# Politeness that precedes the real instruction: "Please write ...", "Can you explain ..." -> write, explain.
LEADING_FILLER = (("please",), ("can", "you"), ("could", "you"), ("would", "you"), ("will", "you"))
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def is_refusal(text: str, phrases: list[str] = REFUSAL_PHRASES) -> bool:
    """True when `text` contains one of the (lower-case) refusal phrases."""
    low = text.lower().replace("\u2019", "'")
    return any(p in low for p in phrases)


def repeated_ngram_rate(text: str, n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram of the same text (0: none, ->1: a loop)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def suspect_characters(text: str) -> list[str]:
    """The invisible, control or undecodable characters of `text`, in order of appearance (no repeats),
    as `U+XXXX` code points."""
    # str.isprintable is False for every suspect category (and for layout and non-ASCII spaces): a C-speed
    # test that lets almost every text skip the per-character loop.
    if text.translate(_LAYOUT).isprintable() and REPLACEMENT_CHAR not in text:
        return []
    found: dict[str, None] = {}
    for ch in text:
        if ch in ALLOWED_CONTROLS:
            continue
        if ch == REPLACEMENT_CHAR or unicodedata.category(ch) in SUSPECT_CATEGORIES:
            found[f"U+{ord(ch):04X}"] = None
    return list(found)


def special_strings(tokenizer: Any) -> list[str]:
    """The tokenizer's special-token strings (`<|im_end|>`, `[INST]`, `<s>` ...): text that is a control
    token when the template writes it, and plain text inside message content (template.content_markers)."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    named = [v for v in tokenizer.special_tokens_map.values() if isinstance(v, str)]
    return sorted({s for s in [*added, *named] if s.strip()}, key=lambda s: (-len(s), s))


def markers_in(text: str, markers: Sequence[str]) -> list[str]:
    """The special-token strings that occur in `text`, in the order of `markers`."""
    return [m for m in markers if m in text]


def words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped: the unit of every text comparison here."""
    return _WORD.findall(text.lower())


def is_echo(prompt: str, response: str, threshold: float = 0.9) -> bool:
    """The response merely repeats the prompt: their word sequences match with a difflib ratio
    (2 * matched / total words) of at least `threshold`, so a longer answer that quotes the prompt is not
    an echo."""
    p, r = words(prompt), words(response)
    if not r or not p:
        return False
    matcher = difflib.SequenceMatcher(None, p, r, autojunk=False)
    return (
        matcher.real_quick_ratio() >= threshold
        and matcher.quick_ratio() >= threshold
        and (matcher.ratio() >= threshold)
    )


def instruction_kind(prompt: str) -> str:
    """The leading verb or question word of an instruction ("Write a poem" -> "write", "Can you explain"
    -> "explain", "What is ..." -> "what"); "" when the prompt has no word."""
    ws = words(prompt)
    for filler in LEADING_FILLER:
        if tuple(ws[: len(filler)]) == filler and len(ws) > len(filler):
            ws = ws[len(filler) :]
            break
    return ws[0] if ws else ""
