"""Dataset rows -> messages ([{"role", "content"}, ...]) or, for plain text, one document string.

Formats (`data.format`, or detected per row from its keys when unset):
  * `messages` (OpenAI): {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
    "tools": [schemas] (optional)}. Content may be a list of text parts ([{"type": "text", "text": ...}]);
    an assistant turn may carry `tool_calls` (content null), a tool turn its `tool_call_id`, an assistant
    turn its reasoning (`reasoning_content` / `thinking`, or `<think>…</think>` in the content: see
    reasoning.py; it becomes `reasoning_content`, the content keeps the answer).
  * `sharegpt`: {"conversations": [{"from": "human"|"gpt"|"system"|"tool"|..., "value": str}, ...],
    "tools": (optional)}; `function_call` turns hold {"name", "arguments"} JSON (a tool call).
  * `alpaca`: {"instruction", "input" (optional), "output", "system" (optional)}
  * `prompt_completion`: {"prompt", "completion", "system" (optional)}
  * `text`: {"text"} — continued pre-training, every token trained.

`data.fields` maps these canonical key names to the dataset's own column names, e.g.
`{instruction: question, output: answer}` or `{messages: chat, role: speaker, content: text}`.

Validation is strict and never coerces: a number where a string belongs is an error, not `str(42)`. Every
error is a `BadRow` carrying a short `reason` code, so lenient mode (`data.on_error=skip`) can count skipped
rows by reason and strict mode can name the file, line, problem and fix.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

from sftlab.data.reasoning import FIELDS as REASONING_FIELDS
from sftlab.data.reasoning import REASONING_KEY, split_reasoning
from sftlab.data.tools import TOOLS_ROLE
from sftlab.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
    "function_call": "assistant",
}
REASONS = (
    "bad_json",
    "not_an_object",
    "unknown_format",
    "missing_field",
    "wrong_type",
    "empty_content",
    "unknown_role",
    "no_assistant",
    "invalid_unicode",
)

Conversation = list[dict] | str  # messages, or one plain-text document (format `text`)


class BadRow(DataError):
    """One invalid row: `reason` is one of REASONS; the message names the row and says what to do."""

    def __init__(self, where: str, reason: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.reason = reason


def check_text(value: object, what: str, where: str, *, allow_empty: bool = False) -> str:
    """A non-empty (unless allowed) string of valid Unicode (a lone surrogate cannot be tokenized)."""
    if value is None:
        raise BadRow(where, "missing_field", f"{what} is missing. Add it or map the column with data.fields.")
    if not isinstance(value, str):
        raise BadRow(
            where,
            "wrong_type",
            f"{what} must be a string, but it is a {type(value).__name__} "
            f"({str(value)[:40]!r}). Store it as a string (quoted); it is never converted silently.",
        )
    if not allow_empty and not value.strip():
        raise BadRow(where, "empty_content", f"{what} is empty. Fill it in or remove the row.")
    try:
        if not value.isascii():  # ASCII (checked in O(1)) holds no surrogate
            value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow(
            where,
            "invalid_unicode",
            f"{what} holds a lone UTF-16 surrogate (e.g. a '\\ud83d' "
            "escape without its pair), which is not text. Fix the encoding of that row.",
        ) from None
    return value


def text_of(content: object, what: str, where: str) -> object:
    """A list of text parts ([{"type": "text", "text": ...}]) joined into one string; anything else as is."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise BadRow(
                where,
                "wrong_type",
                f"{what} has a {kind!r} part; only text parts ({{'type': 'text', 'text'}}) are supported.",
            )
        texts.append(part["text"])
    return "".join(texts)


def check_tool_calls(calls: object, j: int, where: str) -> list[dict]:
    """OpenAI tool calls -> [{"id"?, "type": "function", "function": {"name", "arguments": dict}}]."""
    if not isinstance(calls, list) or not calls:
        raise BadRow(where, "wrong_type", f"message {j} 'tool_calls' must be a non-empty list of calls.")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRow(
                where,
                "missing_field",
                f"message {j} tool call {k} needs 'function': {{'name': str, 'arguments': JSON}}.",
            )
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends a JSON string; templates (and HF Jinja) want the object
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise BadRow(
                    where, "wrong_type", f"message {j} tool call {k} 'arguments' is not valid JSON."
                ) from None
        if not isinstance(args, dict):
            raise BadRow(where, "wrong_type", f"message {j} tool call {k} 'arguments' must be a JSON object.")
        normal = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if call.get("id") is not None:
            normal = {"id": check_text(call["id"], f"message {j} tool call {k} 'id'", where), **normal}
        out.append(normal)
    return out


def check_tools(tools: object, where: str) -> list[dict] | None:
    """Tool schemas (a list, or its JSON string as some datasets store it), or None."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise BadRow(where, "wrong_type", "field 'tools' is a string but not JSON.") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow(where, "wrong_type", "field 'tools' must be a list of tool schemas (objects).")
    for t in tools:
        fn = t.get("function", t)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadRow(where, "missing_field", "each tool needs 'function': {'name', 'parameters', ...}.")
    # A bare function schema is wrapped as OpenAI does.
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


def check_reasoning(m: dict, content: object, j: int, where: str) -> tuple[str, object] | None:
    """(reasoning, answer) of an assistant message, from a reasoning field or `<think>` in its content."""
    given = [key for key in REASONING_FIELDS if m.get(key) is not None]
    inline = split_reasoning(content) if isinstance(content, str) else (None, content)
    if not given:
        return None if inline[0] is None else inline
    if len(given) > 1 or inline[0] is not None:
        found = given + (["<think> in 'content'"] if inline[0] is not None else [])
        raise BadRow(
            where,
            "wrong_type",
            f"message {j} (assistant) has its reasoning twice ({', '.join(found)}). Keep one of them.",
        )
    reasoning = check_text(m[given[0]], f"message {j} (assistant) {given[0]!r}", where, allow_empty=True)
    return reasoning.strip("\n"), content


def check_message(m: object, j: int, where: str) -> dict:
    if not isinstance(m, dict):
        raise BadRow(where, "wrong_type", f"message {j} must be an object, got {type(m).__name__}.")
    if not isinstance(m.get("role"), str):
        raise BadRow(
            where,
            "missing_field" if m.get("role") is None else "wrong_type",
            f"message {j} needs a string 'role' (one of {', '.join(ROLES)}).",
        )
    role = m["role"]
    if role not in ROLES:
        raise BadRow(
            where, "unknown_role", f"message {j} has unknown role {role!r}; allowed: {', '.join(ROLES)}."
        )
    what = f"message {j} ({role}) 'content'"
    content = text_of(m.get("content"), what, where)
    out: dict = {"role": role}
    reasoning = check_reasoning(m, content, j, where) if role == "assistant" else None
    if reasoning is not None:
        out[REASONING_KEY], content = reasoning
        content = "" if content is None else content
    if role == "assistant" and m.get("tool_calls"):
        out["content"] = check_text(content or "", what, where, allow_empty=True)
        out["tool_calls"] = check_tool_calls(m["tool_calls"], j, where)
    else:
        # An answer may be empty after its reasoning (the model thought, then answered with a tool call
        # in the next turn, or nothing); an assistant turn with neither is still an error.
        out["content"] = check_text(content, what, where, allow_empty=reasoning is not None)
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                out[key] = check_text(m[key], f"message {j} (tool) {key!r}", where)
    return out


def check_messages(messages: object, where: str, key: str = "messages", tools: object = None) -> list[dict]:
    """Validate one conversation; raise BadRow naming `where` (file:line), the problem and the fix.
    Returns normalized messages (text content, parsed tool-call arguments), led by the tools message
    ({"role": "tools", "content": JSON}) when there are tool schemas."""
    if messages is None:
        raise BadRow(where, "missing_field", f"field {key!r} is missing. Add it or map it with data.fields.")
    if not isinstance(messages, list):
        raise BadRow(
            where, "wrong_type", f"field {key!r} must be a list of messages, got {type(messages).__name__}."
        )
    if not messages:
        raise BadRow(where, "empty_content", f"field {key!r} is an empty list. Remove the row.")
    out = [check_message(m, j, where) for j, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow(
            where,
            "no_assistant",
            "no assistant message, so nothing to train on. Add the response "
            "turn, or use data.format=text for plain documents.",
        )
    schemas = check_tools(tools, where)
    if schemas:
        out.insert(0, {"role": TOOLS_ROLE, "content": json.dumps(schemas, ensure_ascii=False)})
    return out


class _Row:
    """A row seen through `data.fields`: canonical key -> the dataset's column."""

    def __init__(self, row: dict, fields: Mapping[str, str], where: str) -> None:
        self.row, self.fields, self.where = row, fields, where

    def name(self, key: str) -> str:
        return self.fields.get(key, key)

    def get(self, key: str) -> object:
        return self.row.get(self.name(key))

    def text(self, key: str, optional: bool = False) -> str:
        value = self.get(key)
        if optional and value is None:
            return ""
        if type(value) is str and value.isascii() and (optional or value.strip()):
            return value  # what check_text accepts, without building its message (most fields of most rows)
        return check_text(value, f"field {self.name(key)!r}", self.where, allow_empty=optional)

    def with_system(self, messages: list[dict]) -> list[dict]:
        system = self.text("system", optional=True)
        return [{"role": "system", "content": system}, *messages] if system.strip() else messages


def from_messages(r: _Row) -> list[dict]:
    raw = r.get("messages")
    role, content = r.name("role"), r.name("content")
    if isinstance(raw, list) and (role, content) != ("role", "content"):
        raw = [
            {**m, "role": m.get(role), "content": m.get(content)} if isinstance(m, dict) else m for m in raw
        ]
    return check_messages(raw, r.where, r.name("messages"), tools=r.get("tools"))


def from_sharegpt(r: _Row) -> list[dict]:
    turns = r.get("conversations")
    if not isinstance(turns, list):
        return check_messages(turns, r.where, r.name("conversations"))  # raises the right reason
    messages = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict):
            raise BadRow(r.where, "wrong_type", f"turn {j} must be an object with 'from' and 'value'.")
        speaker = t.get(r.name("from"))
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:  # a list or dict is unhashable
            raise BadRow(
                r.where,
                "unknown_role" if isinstance(speaker, str) else "missing_field",
                f"turn {j} has 'from' {speaker!r}; allowed: {', '.join(SHAREGPT_ROLES)}.",
            )
        value = t.get(r.name("value"))
        if speaker == "function_call":  # {"name", "arguments"} as JSON text (glaive / LLaMA-Factory)
            call = _json_object(value, j, r.where)
            messages.append({"role": "assistant", "content": None, "tool_calls": [{"function": call}]})
        else:
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return check_messages(messages, r.where, r.name("conversations"), tools=r.get("tools"))


def _json_object(value: object, j: int, where: str) -> dict:
    try:
        call = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        call = None
    if not isinstance(call, dict):
        raise BadRow(where, "wrong_type", f"turn {j} (function_call) must hold a JSON object with 'name'.")
    return call


def from_alpaca(r: _Row) -> list[dict]:
    instruction, extra = r.text("instruction"), r.text("input", optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = r.text("output")
    return r.with_system([{"role": "user", "content": prompt}, {"role": "assistant", "content": output}])


def from_prompt_completion(r: _Row) -> list[dict]:
    return r.with_system(
        [
            {"role": "user", "content": r.text("prompt")},
            {"role": "assistant", "content": r.text("completion")},
        ]
    )


def from_text(r: _Row) -> str:
    return r.text("text")


FORMATS: dict[str, Callable[[_Row], Conversation]] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
    "text": from_text,
}
# Checked in this order: the first key present decides.
_SIGNATURES = {
    "messages": "messages",
    "conversations": "sharegpt",
    "instruction": "alpaca",
    "prompt": "prompt_completion",
    "text": "text",
}


def detect_format(row: dict, where: str, fields: Mapping[str, str] | None = None) -> str:
    fields = fields or {}
    for key, fmt in _SIGNATURES.items():
        if fields.get(key, key) in row:
            return fmt
    raise BadRow(
        where,
        "unknown_format",
        f"cannot tell the data format from keys {sorted(row)}. Expected "
        f"one of {sorted(_SIGNATURES)}; set data.format to one of {sorted(FORMATS)} and map "
        "columns with data.fields.",
    )


def to_messages(
    row: object, fmt: str | None, where: str, fields: Mapping[str, str] | None = None
) -> Conversation:
    """One row -> its conversation (or document, for `text`). Raises BadRow with a reason code."""
    if not isinstance(row, dict):
        raise BadRow(where, "not_an_object", f"each row must be a JSON object, got {type(row).__name__}.")
    fields = fields or {}
    fmt = fmt or detect_format(row, where, fields)
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not a format; use one of {sorted(FORMATS)} or null.")
    return FORMATS[fmt](_Row(row, fields, where))


def split_prompt(conversation: Sequence[dict]) -> tuple[list[dict], str]:
    """History up to the last assistant turn, and that turn's content (the reference)."""
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return list(conversation[:last]), conversation[last]["content"]
