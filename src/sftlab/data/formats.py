"""Dataset rows -> messages ([{"role", "content"}, ...]). Pure functions, one per format.

Formats: `messages` (OpenAI), `sharegpt` (conversations/from/value), `alpaca` (instruction/input/output),
`prompt_completion`. `detect_format` picks one from a row's keys when `data.format` is unset.
"""

from __future__ import annotations

from collections.abc import Callable

from sftlab.data.templates import check_messages
from sftlab.errors import DataError

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "function_response": "tool"}


def _field(row: dict, key: str, where: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: field {key!r} must be a string, but it is {got}.")
    return value


def from_messages(row: dict, where: str) -> list[dict]:
    return check_messages(row.get("messages"), where)


def from_sharegpt(row: dict, where: str) -> list[dict]:
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise DataError(f"{where}: field 'conversations' must be a list of {{from, value}} objects.")
    messages = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES:
            raise DataError(f"{where}: turn {j} needs 'from' in {sorted(SHAREGPT_ROLES)}.")
        messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")})
    return check_messages(messages, where)


def from_alpaca(row: dict, where: str) -> list[dict]:
    instruction = _field(row, "instruction", where)
    extra = _field(row, "input", where, optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return check_messages(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": _field(row, "output", where)}], where
    )


def from_prompt_completion(row: dict, where: str) -> list[dict]:
    return check_messages(
        [{"role": "user", "content": _field(row, "prompt", where)},
         {"role": "assistant", "content": _field(row, "completion", where)}],
        where,
    )


FORMATS: dict[str, Callable[[dict, str], list[dict]]] = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
}
_SIGNATURES = {"messages": "messages", "conversations": "sharegpt", "instruction": "alpaca", "prompt": "prompt_completion"}


def detect_format(row: dict, where: str) -> str:
    for key, fmt in _SIGNATURES.items():
        if key in row:
            return fmt
    raise DataError(
        f"{where}: cannot tell the data format from keys {sorted(row)}. Expected one of "
        f"{sorted(_SIGNATURES)}; or set data.format to one of {sorted(FORMATS)}."
    )


def to_messages(row: object, fmt: str | None, where: str) -> list[dict]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: each row must be a JSON object, got {type(row).__name__}.")
    return FORMATS[fmt or detect_format(row, where)](row, where)
