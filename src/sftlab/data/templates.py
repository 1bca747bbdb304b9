"""Chat templates: messages -> text segments, each flagged trained or not.

Labels are made from these flags by construction (see tokenize.py), never by searching token ids for a
response string. A template owns three facts that must agree between training and inference:
  * `render(messages)`: the training text, split so that every assistant turn's content *and its end-of-turn
    marker* form trained segments;
  * `generation_prompt(messages)`: exactly the untrained prefix that precedes an assistant turn in `render`;
  * `stop_strings`: what ends an assistant turn, for generation.

One template = one config file under conf/template/ naming this class as `_target_` with its strings.
`{bos_token}` / `{eos_token}` in a template string stand for the tokenizer's own tokens (alpaca ends a
response with EOS, whatever the model calls it); `bind(tokenizer)` fills them in; tokenize.py calls it.

`TokenizerTemplate` (`template=tokenizer`) uses the tokenizer's own Jinja chat template instead: it renders
prefixes of the conversation and diffs the strings to find each assistant span, so no token ids are searched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sftlab.data.tools import no_tool_format, split_tools, tool_format, uses_tools
from sftlab.errors import ConfigError, DataError

TRAIN_ON = ("all_assistant", "last_assistant", "all")
PLACEHOLDERS = ("bos_token", "eos_token")


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool
    # Message text (not template markup): tokenized with special-token parsing off, so a chat marker typed
    # in the content ("[INST]", "<|eot_id|>") stays plain text, as the vendors' encoders keep it.
    literal: bool = False


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
    # Prepend the tokenizer's BOS token id once: true, false, or "auto" = where the tokenizer itself adds one
    # (Llama, Mistral, Gemma do; GPT-2-style tokenizers such as SmolLM2's do not).
    bos: bool | str = False
    default_system: str | None = None
    stop_strings: list[str] = field(default_factory=list)
    # Characters stripped from the end of a role's content, e.g. {assistant: " "}: mistral-common encodes
    # `content.rstrip(" ")`, so a trailing space is never trained before Mistral's `</s>`.
    rstrip: dict[str, str] = field(default_factory=dict)
    # How the model writes tool schemas, calls and results (sftlab.data.tools.FORMATS), or None: then a
    # conversation with tools or tool calls is refused (a plain `tool` turn still renders as a role).
    tool_format: str | None = None
    # Filled by `bind`: the tokenizer's special-token strings for `{bos_token}` / `{eos_token}` placeholders.
    special: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def bind(self, tokenizer: Any) -> ChatTemplate:
        """Resolve `{bos_token}` / `{eos_token}` and `bos: auto` for this tokenizer (idempotent)."""
        self.special = {k: getattr(tokenizer, k) or "" for k in PLACEHOLDERS}
        bos = self.bos
        if bos == "auto":
            ids = tokenizer("a")["input_ids"]
            bos = tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
        self.special["use_bos"] = bool(bos)
        return self

    def uses_bos(self) -> bool:
        if self.bos == "auto" and "use_bos" not in self.special:
            raise RuntimeError(f"template {self.name!r} has bos: auto: call bind(tokenizer) first")
        return bool(self.special.get("use_bos", self.bos))

    def _fill(self, text: str) -> str:
        if "{" not in text:
            return text
        for key in PLACEHOLDERS:
            if "{" + key + "}" in text:
                if key not in self.special:
                    raise RuntimeError(f"template {self.name!r} uses {{{key}}}: call bind(tokenizer) first")
                text = text.replace("{" + key + "}", self.special[key])
        return text

    def _prefix(self, role: str) -> str:
        return self._fill(self.prefixes.get(role, self.prefixes.get("default", "")).replace("{role}", role))

    def _suffix(self, role: str) -> str:
        return self._fill(self.suffixes.get(role, self.suffixes.get("default", "")))

    def _with_system(self, messages: Sequence[dict]) -> list[dict]:
        msgs = [dict(m) for m in messages]
        if self.default_system is not None and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": self.default_system})
        if self.system_mode == "merge_user" and msgs and msgs[0]["role"] == "system":
            system = msgs.pop(0)["content"]
            first_user = next((m for m in msgs if m["role"] == "user"), None)
            if first_user is not None and system:  # an empty system adds nothing (as mistral-common)
                first_user["content"] = f"{system}\n\n{first_user['content']}"
        return msgs

    def render(self, messages: Sequence[dict], train_on: str = "all_assistant") -> list[Segment]:
        tools, msgs = split_tools(messages)
        msgs = self._with_system(msgs)
        fmt = tool_format(self.tool_format, self.name)
        if fmt is None and uses_tools(tools, msgs):
            raise no_tool_format(self.name)
        first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
        if tools and first_user is None:
            raise DataError(f"template={self.name}: tool schemas need a user turn to precede.")
        last_assistant = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)
        every = train_on == "all"
        segments: list[Segment] = []
        for i, m in enumerate(msgs):
            role = m["role"]
            trained = (
                every
                or (role == "assistant" and train_on == "all_assistant")
                or (i == last_assistant and train_on == "last_assistant")
            )
            if tools and i == first_user:  # schemas go with the first user turn, as system messages do
                segments += [
                    Segment(fmt.tools_open, every),
                    Segment(fmt.schemas(tools), every, literal=True),
                    Segment(fmt.tools_close, every),
                ]
            segments.append(Segment(self._prefix(role), every))
            if role == "assistant" and m.get("tool_calls"):
                if m["content"]:
                    raise DataError(
                        f"template={self.name}: an assistant turn has both content and tool_calls; this "
                        "model writes one or the other. Split it into two assistant turns."
                    )
                segments.append(Segment(fmt.calls_open, trained))
                segments.append(Segment(fmt.calls(m["tool_calls"]), trained, literal=True))
            else:
                content = fmt.result(m) if fmt and role == "tool" else m["content"]
                content = content.rstrip(self.rstrip[role]) if role in self.rstrip else content
                segments.append(
                    Segment(self._fill(self.leads.get(role, "")) + content, trained, literal=True)
                )
            segments.append(Segment(self._suffix(role), trained))
            if self.separator:
                segments.append(Segment(self._fill(self.separator), every))
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
        # Placeholders are resolved here, so the saved template is exact for the tokenizer it is saved with.
        fill = self._fill
        j = json.dumps
        prefixes, suffixes = ({k: fill(v) for k, v in d.items()} for d in (self.prefixes, self.suffixes))
        leads = {k: fill(v) for k, v in self.leads.items()}
        rstrip = j(self.rstrip)
        default_system = "none" if self.default_system is None else j(self.default_system)
        merge = "true" if self.system_mode == "merge_user" else "false"
        return (
            f"{{%- set P = {j(prefixes)} -%}}{{%- set S = {j(suffixes)} -%}}{{%- set L = {j(leads)} -%}}"
            # Tool schemas and calls are rendered by sftlab in training, not (yet) by this saved template:
            # a serving stack gets an error instead of a prompt that silently drops them.
            "{%- if tools or (messages|selectattr('tool_calls')|list) -%}"
            "{{- raise_exception('this saved sftlab template does not render tools / tool_calls') -}}"
            "{%- endif -%}"
            "{%- set msgs = messages -%}"
            f"{{%- if {default_system} is not none and (msgs|length == 0 or msgs[0]['role'] != 'system') -%}}"
            f"{{%- set msgs = [{{'role': 'system', 'content': {default_system}}}] + msgs -%}}{{%- endif -%}}"
            f"{{%- set R = {rstrip} -%}}"
            "{%- set ns = namespace(system=none, merged=false) -%}"
            f"{{%- if {merge} and msgs|length > 0 and msgs[0]['role'] == 'system' -%}}"
            "{%- if msgs[0]['content'] -%}{%- set ns.system = msgs[0]['content'] -%}{%- endif -%}"
            "{%- set msgs = msgs[1:] -%}{%- endif -%}"
            + ("{{- bos_token -}}" if self.uses_bos() else "")
            + "{%- for m in msgs -%}{%- set content = m['content'] -%}"
            "{%- if m['role'] in R -%}{%- set content = content.rstrip(R[m['role']]) -%}{%- endif -%}"
            "{%- if ns.system is not none and m['role'] == 'user' and not ns.merged -%}"
            "{%- set content = ns.system + '\n\n' + content -%}{%- set ns.merged = true -%}{%- endif -%}"
            "{{- P.get(m['role'], P.get('default', '')).replace('{role}', m['role']) + L.get(m['role'], '')"
            f" + content + S.get(m['role'], S.get('default', '')) + {j(fill(self.separator))} -}}}}"
            "{%- endfor -%}{%- if add_generation_prompt -%}"
            "{{- P.get('assistant', P.get('default', '')).replace('{role}', 'assistant') -}}{%- endif -%}"
        )


@dataclass
class TokenizerTemplate:
    """`template=tokenizer`: the tokenizer's own Jinja chat template (or `chat_template` given here).

    Spans come from rendering prefixes of the conversation and diffing the strings: for assistant turn i,
    `render(msgs[:i], add_generation_prompt=True)` is the untrained prompt, and the text up to the end of
    `render(msgs[:i+1])` holds the response. The trained span runs from the end of that prompt to the first
    special token (the end-of-turn marker, e.g. `<|im_end|>`, `<|eot_id|>`) after the response content; text
    after it (a newline) is untrained, as with the named templates. Templates that rewrite earlier turns
    (so a shorter conversation is not a prefix of a longer one) are refused with a message, never guessed at.
    The Jinja template usually writes BOS itself, so `bos` stays false.
    """

    name: str = "tokenizer"
    chat_template: str | None = None
    stop_strings: list[str] = field(default_factory=list)
    bos: bool = False
    tokenizer: Any = field(default=None, init=False, repr=False, compare=False)
    specials: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def uses_bos(self) -> bool:
        return bool(self.bos)

    def bind(self, tokenizer: Any) -> TokenizerTemplate:
        if not (self.chat_template or getattr(tokenizer, "chat_template", None)):
            raise ConfigError(
                "template=tokenizer: this tokenizer has no chat_template. Pick a named template "
                "(template=chatml|llama3|mistral|gemma|alpaca) or set template.chat_template (Jinja)."
            )
        if tokenizer is not self.tokenizer:
            self.tokenizer = tokenizer
            special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
            self.specials = sorted(special | set(tokenizer.all_special_tokens), key=len, reverse=True)
        return self

    def _apply(self, messages: Sequence[dict], generation: bool, tools: list[dict] | None = None) -> str:
        if self.tokenizer is None:
            raise RuntimeError("template=tokenizer: call bind(tokenizer) first")
        return self.tokenizer.apply_chat_template(
            list(messages),
            tools=tools,
            tokenize=False,
            add_generation_prompt=generation,
            chat_template=self.chat_template,
        )

    def _response_end(self, upto: str, start: int, content: str) -> int:
        """End of the trained span: the response content plus the end-of-turn token that follows it."""
        span = upto[start:]
        k = span.find(content)
        if k < 0 and content.strip():  # e.g. Llama 3 templates `| trim` the content
            content = content.strip()
            k = span.find(content)
        if k < 0:
            raise DataError(
                "template=tokenizer: the chat template does not render the assistant content verbatim, so "
                "its span cannot be found. Use a named template (template=chatml|llama3|...)."
            )
        tail_at = start + k + len(content)
        tail = upto[tail_at:]
        hits = [(tail.find(tok), len(tok)) for tok in self.specials if tok in tail]
        if not hits:
            return len(upto)
        at, length = min(hits)
        return tail_at + at + length

    def _spans(
        self, msgs: Sequence[dict], tools: list[dict] | None
    ) -> tuple[str, list[tuple[int, int, int]]]:
        """The rendered text and, per assistant turn, (message index, start, end) of its response span."""
        full = self._apply(msgs, False, tools)
        if tools and not any(json.dumps(t["function"]["name"])[1:-1] in full for t in tools):
            raise DataError(
                "template=tokenizer: this chat template does not render the conversation's tools (their "
                "names are missing from the text). Use a tokenizer whose template supports tools, or "
                "template=mistral."
            )
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self._apply(msgs[:i], True, tools)
            upto = full if i == len(msgs) - 1 else self._apply(msgs[: i + 1], False, tools)
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise DataError(
                    f"template=tokenizer: rendering assistant turn {i} does not extend the earlier turns "
                    "(it rewrites history, e.g. drops reasoning), so the training prompt would differ "
                    "from the inference prompt. Use a named template."
                )
            spans.append((i, len(prompt), self._response_end(upto, len(prompt), m["content"])))
        return full, spans

    @staticmethod
    def _cut(text: str, spans: list[tuple[int, int, int]], train_on: str) -> list[Segment]:
        last = spans[-1][0] if spans else -1
        segments, pos = [], 0
        for i, start, end in spans:
            trained = train_on in ("all", "all_assistant") or (train_on == "last_assistant" and i == last)
            segments += [Segment(text[pos:start], train_on == "all"), Segment(text[start:end], trained)]
            pos = end
        segments.append(Segment(text[pos:], train_on == "all"))
        return [s for s in segments if s.text]

    def render(self, messages: Sequence[dict], train_on: str = "all_assistant") -> list[Segment]:
        tools, msgs = split_tools(messages)
        full, spans = self._spans(msgs, tools)
        return self._cut(full, spans, train_on)

    def generation_prompt(self, messages: Sequence[dict]) -> list[Segment]:
        """Cut at the same places as `render`, so its tokens are the prefix of the training tokens."""
        tools, msgs = split_tools(messages)
        full, spans = self._spans(msgs, tools)
        prompt = self._apply(msgs, True, tools)
        if not prompt.startswith(full):
            raise DataError("template=tokenizer: add_generation_prompt=True does not extend the history.")
        return self._cut(prompt, spans, "none")

    def to_jinja(self) -> str:
        if self.chat_template is None and self.tokenizer is None:
            raise RuntimeError("template=tokenizer: call bind(tokenizer) first")
        return self.chat_template or self.tokenizer.chat_template
