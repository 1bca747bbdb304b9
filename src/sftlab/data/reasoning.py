"""Reasoning ("thinking") turns: read them, keep or drop them per `data.reasoning`, split model outputs.

Canonical form: an assistant message carries its reasoning in `reasoning_content` (the key Qwen3's and
DeepSeek-R1's Jinja templates and vLLM's reasoning parsers use) and its final answer in `content`. Rows may
give the reasoning in that field, in `thinking` (GPT-OSS style), or as `<think>…</think>` at the start of the
content; all three end up in `reasoning_content`.

Parsing follows Qwen3's own chat template, so that sftlab reads a row as the model's template would: the
reasoning is the text before the first `</think>` (after a `<think>`, if any), with newlines stripped from
both ends, and the answer is the text after the last `</think>`, leading newlines stripped. A model's output
that starts inside the reasoning (prompts that open `<think>` themselves, as DeepSeek-R1's do) is split the
same way; an output cut off before `</think>` is all reasoning and has an empty answer.

Policies (`data.reasoning`), applied to a conversation before the template renders it:
  * `keep_last` (default): reasoning is kept only on the assistant turns after the last user message (the
    final answer and a tool-calling chain leading to it) and dropped from the history. This is what Qwen3's
    and DeepSeek-R1's templates render at inference, and what sftlab-chat / sftlab-eval feed back as
    history, so the training prompt of every turn equals its inference prompt.
  * `keep_all`: every assistant turn keeps its reasoning (for a model whose inference template keeps it).
  * `drop`: reasoning is never rendered nor trained (answers only).
"""

from __future__ import annotations

from collections.abc import Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_KEY = "reasoning_content"
FIELDS = (REASONING_KEY, "thinking")  # where rows may carry reasoning beside the content
POLICIES = ("keep_last", "keep_all", "drop")


def split_reasoning(text: str) -> tuple[str | None, str]:
    """`(reasoning, answer)` of an assistant text; reasoning is None when the text has no think block."""
    if THINK_CLOSE not in text:
        stripped = text.lstrip()
        if stripped.startswith(THINK_OPEN):  # cut off while reasoning: no answer yet
            return stripped[len(THINK_OPEN) :].strip("\n"), ""
        return None, text
    before = text.split(THINK_CLOSE)[0]
    reasoning = before.rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
    return reasoning, text.split(THINK_CLOSE)[-1].lstrip("\n")


def strip_reasoning(text: str) -> str:
    """The final answer of a model output (what exact match compares)."""
    return split_reasoning(text)[1]


def inline_to_field(messages: Sequence[dict]) -> list[dict]:
    """Assistant messages with `<think>…</think>` in their content (as an OpenAI client sends a reasoning
    model's earlier replies back) in the canonical form the readers produce, so a served or chat prompt
    drops them from the history exactly as training did."""
    out = []
    for m in messages:
        content = m.get("content")
        if m.get("role") == "assistant" and REASONING_KEY not in m and isinstance(content, str):
            reasoning, answer = split_reasoning(content)
            if reasoning is not None:
                m = {**m, REASONING_KEY: reasoning, "content": answer}
        out.append(m)
    return out


def apply_reasoning(messages: Sequence[dict], policy: str) -> list[dict]:
    """The conversation as the template should render it under `policy` (see the module docstring)."""
    if policy not in POLICIES:
        raise ValueError(f"reasoning policy {policy!r}: use one of {POLICIES}")
    if policy == "keep_all" or not any(REASONING_KEY in m for m in messages):
        return list(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out = []
    for i, m in enumerate(messages):
        if REASONING_KEY in m and (policy == "drop" or i < last_user):
            m = {k: v for k, v in m.items() if k != REASONING_KEY}
        out.append(m)
    return out


class AnswerStream:
    """Streams the answer of an output that may open with `<think>…</think>`, holding back the reasoning.

    `feed(delta)` returns the text that can be shown now; `close()` the rest. Text is held only while the
    output could still be a reasoning block (it starts with `<think>`, or with a prefix of it); an output that
    does not start with the tag streams unchanged. sftlab-chat uses it (reasoning=strip); so can a server.
    """

    def __init__(self) -> None:
        self.text = ""
        self.state = "start"  # start -> thinking -> answer (or start -> answer)
        self.shown = 0

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.state == "start":
            head = self.text.lstrip()
            if THINK_OPEN.startswith(head):  # too early to tell (e.g. "<th")
                return ""
            self.state = "thinking" if head.startswith(THINK_OPEN) else "answer"
        if self.state == "thinking":
            if THINK_CLOSE not in self.text:
                return ""
            self.state = "answer"
            answer = self.text.split(THINK_CLOSE, 1)[1]
            self.shown = len(self.text) - len(answer.lstrip("\n"))
            if not answer.lstrip("\n"):  # the newlines after </think> may still come
                self.state = "after_close"
                return ""
        if self.state == "after_close":
            rest = self.text[self.shown :].lstrip("\n")
            if not rest:
                return ""
            self.shown = len(self.text) - len(rest)
            self.state = "answer"
        out = self.text[self.shown :]
        self.shown = len(self.text)
        return out

    def close(self) -> str:
        """What is left to show once the output ended (an unfinished reasoning block shows nothing)."""
        if self.state == "start":  # a short output that only looked like the start of a tag
            self.state, self.shown = "answer", len(self.text)
            return self.text
        return ""

    @property
    def reasoning(self) -> str | None:
        return split_reasoning(self.text)[0]
