"""Chat templates: messages -> text segments, each flagged trained or not.

Labels are made from these flags by construction (see tokenize.py), never by searching token ids for a
response string. A template owns three facts that must agree between training and inference:
  * `render(messages)`: the training text, split so that every assistant turn's content *and its end-of-turn
    marker* form trained segments;
  * `generation_prompt(messages)`: exactly the untrained prefix that precedes an assistant turn in `render`;
  * `stop_strings`: what ends an assistant turn, for generation.

One template = one config file under conf/template/ naming this class as `_target_` with its strings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from sftlab.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("all_assistant", "last_assistant", "all")


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool


@dataclass
class ChatTemplate:
    """A role-tagged template: `{prefix}{content}{suffix}` per message, strings per role.

    `{role}` in a prefix is replaced by the role name. The assistant `suffix` is the end-of-turn marker and is
    trained with the content; `separator` follows every turn untrained (e.g. the newline after `<|im_end|>`).
    """

    name: str
    prefixes: dict[str, str]
    suffixes: dict[str, str]
    separator: str = ""
    # Trained text placed before the content, e.g. Mistral's space after `[/INST]`: it must be tokenized with
    # the content ("▁The"), so it cannot sit in the untrained prefix.
    leads: dict[str, str] = field(default_factory=dict)
    # "turn": the system message is its own turn; "merge_user": it is prepended to the first user message
    # (templates without a system role, e.g. Mistral v0.3).
    system_mode: str = "turn"
    bos: bool = False  # prepend the tokenizer's BOS token id once
    default_system: str | None = None
    stop_strings: list[str] = field(default_factory=list)

    def _prefix(self, role: str) -> str:
        return self.prefixes.get(role, self.prefixes.get("default", "")).replace("{role}", role)

    def _suffix(self, role: str) -> str:
        return self.suffixes.get(role, self.suffixes.get("default", ""))

    def _with_system(self, messages: Sequence[dict]) -> list[dict]:
        msgs = [dict(m) for m in messages]
        if self.default_system is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": self.default_system})
        if self.system_mode == "merge_user" and msgs and msgs[0]["role"] == "system":
            system = msgs.pop(0)["content"]
            first_user = next((m for m in msgs if m["role"] == "user"), None)
            if first_user is not None:
                first_user["content"] = f"{system}\n\n{first_user['content']}"
        return msgs

    def render(self, messages: Sequence[dict], train_on: str = "all_assistant") -> list[Segment]:
        msgs = self._with_system(messages)
        last_assistant = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        segments: list[Segment] = []
        for i, m in enumerate(msgs):
            role = m["role"]
            trained = (
                train_on == "all"
                or (role == "assistant" and train_on == "all_assistant")
                or (i == last_assistant and train_on == "last_assistant")
            )
            segments.append(Segment(self._prefix(role), train_on == "all"))
            segments.append(Segment(self.leads.get(role, "") + m["content"] + self._suffix(role), trained))
            if self.separator:
                segments.append(Segment(self.separator, train_on == "all"))
        return [s for s in segments if s.text]

    def generation_prompt(self, messages: Sequence[dict]) -> list[Segment]:
        """The untrained prefix inference feeds the model: history + the assistant header."""
        segments = self.render(messages, train_on="none")
        return [*segments, Segment(self._prefix("assistant"), False)]

    def to_jinja(self) -> str:
        """The same template as a Hugging Face chat template, saved with the tokenizer of a finished run.

        A test checks that `apply_chat_template` with it renders exactly the text of `render` and
        `generation_prompt`, so serving stacks (vLLM, transformers) prompt the model as training did.
        """
        j = json.dumps
        default_system = "none" if self.default_system is None else j(self.default_system)
        merge = "true" if self.system_mode == "merge_user" else "false"
        return (
            f"{{%- set P = {j(self.prefixes)} -%}}{{%- set S = {j(self.suffixes)} -%}}{{%- set L = {j(self.leads)} -%}}"
            "{%- set msgs = messages -%}"
            f"{{%- if {default_system} is not none and (msgs|length == 0 or msgs[0]['role'] != 'system') -%}}"
            f"{{%- set msgs = [{{'role': 'system', 'content': {default_system}}}] + msgs -%}}{{%- endif -%}}"
            "{%- set ns = namespace(system=none, merged=false) -%}"
            f"{{%- if {merge} and msgs|length > 0 and msgs[0]['role'] == 'system' -%}}"
            "{%- set ns.system = msgs[0]['content'] -%}{%- set msgs = msgs[1:] -%}{%- endif -%}"
            + ("{{- bos_token -}}" if self.bos else "")
            + "{%- for m in msgs -%}{%- set content = m['content'] -%}"
            "{%- if ns.system is not none and m['role'] == 'user' and not ns.merged -%}"
            "{%- set content = ns.system + '\n\n' + content -%}{%- set ns.merged = true -%}{%- endif -%}"
            "{{- P.get(m['role'], P.get('default', '')).replace('{role}', m['role']) + L.get(m['role'], '')"
            f" + content + S.get(m['role'], S.get('default', '')) + {j(self.separator)} -}}}}"
            "{%- endfor -%}{%- if add_generation_prompt -%}"
            "{{- P.get('assistant', P.get('default', '')).replace('{role}', 'assistant') -}}{%- endif -%}"
        )


def check_messages(messages: object, where: str) -> list[dict]:
    """Validate one conversation; raise DataError naming `where` (file:line) and the fix."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}.")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {j} must be an object with string 'role' and 'content'.")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {j} has unknown role {m['role']!r}; allowed: {', '.join(ROLES)}.")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to train on. Add the response turn.")
    return messages
