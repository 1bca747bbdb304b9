"""Tool calling in OpenAI's format: validation of rows, and the tool formats of the built-in templates.

A conversation carries its tool schemas as a leading message `{"role": "tools", "content": "<JSON list>"}`
(so they travel with the messages through dedupe, splits, caches and prompts); assistant turns carry
`tool_calls` ([{"id", "type": "function", "function": {"name", "arguments": dict}}], content "");
tool turns carry `tool_call_id`. Schemas and results are never trained; an assistant's calls are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sftlab.errors import DataError

TOOLS_ROLE = "tools"


def split_tools(messages: Sequence[dict]) -> tuple[list[dict] | None, list[dict]]:
    """The tool schemas of a conversation (None without), and its messages without the tools message."""
    tools = None
    rest = []
    for m in messages:
        if m["role"] == TOOLS_ROLE:
            tools = json.loads(m["content"])
        else:
            rest.append(m)
    return tools, rest


def uses_tools(tools: list[dict] | None, messages: Sequence[dict]) -> bool:
    return bool(tools) or any(m.get("tool_calls") for m in messages)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass(frozen=True)
class ToolFormat:
    """How a model family writes schemas, calls and results (markers are the tokenizer's control tokens)."""

    name: str
    tools_open: str  # before the schemas, which precede the first user turn
    tools_close: str
    calls_open: str  # the model's first output token of a tool-call turn (trained)
    # The end token of a tool-call turn (trained), None: the template's assistant suffix.
    calls_end: str | None = None
    # True: the schemas open the first user message, after its header (Llama 3.1); False: they precede the
    # first user turn (Mistral's [AVAILABLE_TOOLS]).
    schemas_in_user: bool = False

    def schemas(self, tools: list[dict]) -> str:
        raise NotImplementedError

    def calls(self, tool_calls: list[dict]) -> str:
        raise NotImplementedError

    def result(self, message: dict) -> str:
        raise NotImplementedError


class MistralV3(ToolFormat):
    """mistral-common's InstructTokenizerV3: JSON after a space (the sentencepiece dummy prefix)."""

    def schemas(self, tools: list[dict]) -> str:
        out = []
        for t in tools:
            f = t.get("function", {})
            fn = {
                "name": f.get("name"),
                "description": f.get("description", ""),
                "parameters": f["parameters"],
            }
            out.append({"type": t.get("type", "function"), "function": fn})
        return " " + json.dumps(out, ensure_ascii=False)

    def calls(self, tool_calls: list[dict]) -> str:
        out = []
        for c in tool_calls:
            call = {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            if c.get("id") and c["id"] != "null":
                call["id"] = c["id"]
            out.append(call)
        return " " + json.dumps(out, ensure_ascii=False)

    def result(self, message: dict) -> str:
        if not message.get("tool_call_id"):  # no call to link to (e.g. sharegpt observations): as written
            return message["content"]
        body = {"content": _json_or_text(message["content"]), "call_id": message["tool_call_id"]}
        return json.dumps(body, ensure_ascii=False)  # after the template's lead space


# Meta's Llama 3.1 chat template (tools_in_user_message, the default), word for word: the schemas open the
# first user message.
LLAMA3_TOOLS_INSTRUCTION = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)


class Llama3Json(ToolFormat):
    """Llama 3.1's JSON tool calls as Meta's own encoder (`llama-models` ChatFormat, ToolPromptFormat.json)
    writes them: each call `{"type": "function", "name", "parameters"}` (json.dumps defaults, so non-ASCII is
    \\u-escaped), calls back to back, the turn ended by `<|eom_id|>` (the model stops for the result: the stop
    reason end_of_message). ChatFormat has no place for schemas; they follow Meta's Llama 3.1 Jinja. Results
    go under the `ipython` role as written."""

    def schemas(self, tools: list[dict]) -> str:
        # `tojson(indent=4)` of transformers' chat templates: json.dumps without ASCII escaping.
        return LLAMA3_TOOLS_INSTRUCTION + "".join(
            json.dumps(t, ensure_ascii=False, indent=4) + "\n\n" for t in tools
        )

    def calls(self, tool_calls: list[dict]) -> str:
        return "".join(
            json.dumps(
                {"type": "function", "name": c["function"]["name"], "parameters": c["function"]["arguments"]}
            )
            for c in tool_calls
        )

    def result(self, message: dict) -> str:
        return message["content"]


FORMATS: dict[str, ToolFormat] = {
    "llama3_json": Llama3Json(
        "llama3_json", "", "", calls_open="", calls_end="<|eom_id|>", schemas_in_user=True
    ),
    "mistral_v3": MistralV3(
        "mistral_v3", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", calls_open="[TOOL_CALLS]"
    ),
}


def tool_format(name: str | None, template: str) -> ToolFormat | None:
    if name is None:
        return None
    if name not in FORMATS:
        raise DataError(f"template {template!r}: unknown tool_format {name!r}; known: {sorted(FORMATS)}.")
    return FORMATS[name]


def no_tool_format(template: str) -> DataError:
    return DataError(
        f"template={template} has no tool format, so this conversation's tools / tool_calls cannot be "
        "rendered as the model expects (they are never flattened into text silently). Use template=mistral "
        "or template=llama3, or template=tokenizer with a tokenizer whose chat template renders tools "
        "(e.g. Qwen)."
    )
