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
prefixes of the conversation and diffs the strings to find each assistant span, so no token ids are searched;
where the Jinja marks the spans itself (`{% generation %}`), the two must agree.

Reasoning (`reasoning_content`, see reasoning.py) is written as a trained `<think>` block before the answer;
which turns keep it is decided before rendering (`data.reasoning`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sftlab.data.reasoning import REASONING_KEY, THINK_CLOSE
from sftlab.data.tools import TOOLS_ROLE, no_tool_format, split_tools, tool_format, uses_tools
from sftlab.errors import ConfigError, DataError

TRAIN_ON = ("all_assistant", "last_assistant", "all")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects the markers
PLACEHOLDERS = ("bos_token", "eos_token")


# What a segment holds, for display (sftlab-inspect): labels depend only on `Segment.train`.
KINDS = ("text", "reasoning", "tool_call", "tool_result", "tools")
CONTENT_MARKERS = ("text", "special")


@dataclass(frozen=True)
class Segment:
    text: str
    train: bool
    # Message text (not template markup): tokenized with special-token parsing off, so a chat marker typed
    # in the content ("[INST]", "<|eot_id|>") stays plain text, as the vendors' encoders keep it.
    literal: bool = False
    kind: str = "text"


def reasoning_segments(
    think_open: str, think_close: str, lead: str, reasoning: str, trained: bool, literal: bool
) -> list[Segment]:
    """`{think_open}{reasoning}{think_close}`, cut where the vendor's whole-string tokenization cuts: the
    whitespace before `</think>` goes with the reasoning (byte-level BPE merges "." and "\n" into one token),
    and an empty block is one piece of markup ("<think>\n\n</think>": "\n\n" is one token)."""
    if not reasoning:
        return [Segment(lead + think_open + think_close, trained, kind="reasoning")]
    close = think_close.lstrip()
    space = think_close[: len(think_close) - len(close)]
    return [
        Segment(lead + think_open, trained, kind="reasoning"),
        Segment(reasoning + space, trained, literal=literal, kind="reasoning"),
        Segment(close, trained, kind="reasoning"),
    ]


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
    # How a kept reasoning is written before the answer (trained with it): Qwen3's and DeepSeek-R1's
    # `<think>\n{reasoning}\n</think>\n\n{answer}`. Which turns keep it: `data.reasoning` (reasoning.py).
    think_open: str = "<think>\n"
    think_close: str = "\n</think>\n\n"
    # "text" (default): a chat marker inside message content ("<|im_end|>", "[INST]") is tokenized as the
    # plain text it is, as the vendors' encoders do, so data or a user cannot forge a turn. "special": as
    # sftlab did before, such a string in content becomes the control token (data built to rely on it).
    content_markers: str = "text"
    # Filled by `bind`: the tokenizer's special-token strings for `{bos_token}` / `{eos_token}` placeholders.
    special: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    # Per role and train_on, its filled markup and markup segments (see `_role_parts`): emptied by `bind`.
    _parts: dict[tuple, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.content_markers not in CONTENT_MARKERS:
            raise ConfigError(
                f"template.content_markers={self.content_markers!r}: use text (markers in message content "
                "stay text) or special (they become control tokens)."
            )

    @property
    def literal_content(self) -> bool:
        return self.content_markers == "text"

    def bind(self, tokenizer: Any) -> ChatTemplate:
        """Resolve `{bos_token}` / `{eos_token}` and `bos: auto` for this tokenizer (idempotent)."""
        self.special = {k: getattr(tokenizer, k) or "" for k in PLACEHOLDERS}
        bos = self.bos
        if bos == "auto":
            ids = tokenizer("a")["input_ids"]
            bos = tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
        self.special["use_bos"] = bool(bos)
        self._parts.clear()
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

    def _reasoning(self, lead: str, reasoning: str, trained: bool) -> list[Segment]:
        return reasoning_segments(
            self.think_open, self.think_close, lead, reasoning, trained, self.literal_content
        )

    def render(self, messages: Sequence[dict], train_on: str = "all_assistant") -> list[Segment]:
        tool_results = self.tool_format is not None  # written by the tool format: not plain
        for m in messages:
            role = m["role"]
            if (
                role == TOOLS_ROLE
                or REASONING_KEY in m
                or m.get("tool_calls")
                or (tool_results and role == "tool")
            ):
                return self._render(messages, train_on)
        return self._render_plain(messages, train_on)

    def _role_parts(self, role: str, train_on: str) -> tuple:
        """What `_render_plain` writes for a role under `train_on`, filled once per binding: (prefix segment
        or None, lead, kind, rstrip the content?, with what, trained wherever it is, suffix segment when
        trained, and when not)."""
        key = (role, train_on)
        parts = self._parts.get(key)
        if parts is None:
            tool_format(self.tool_format, self.name)  # an unknown tool_format fails here as in `_render`
            kind = "tool_result" if role == "tool" else "text"
            every = train_on == "all"
            prefix, suffix = self._prefix(role), self._suffix(role)
            parts = (
                Segment(prefix, every, kind=kind) if prefix else None,
                self._fill(self.leads.get(role, "")),
                kind,
                role in self.rstrip,
                self.rstrip.get(role),
                every or (role == "assistant" and train_on == "all_assistant"),
                Segment(suffix, True, kind=kind) if suffix else None,
                Segment(suffix, False, kind=kind) if suffix else None,
            )
            self._parts[key] = parts
        return parts

    def _render_plain(self, messages: Sequence[dict], train_on: str) -> list[Segment]:
        """`_render` of messages with no tools, tool calls or reasoning (most rows of most data sets), in a
        fraction of its time: the markup of each role is filled once per binding and its segments are
        shared, no message is copied. Data preparation renders every row, so this is a large part of the
        Python work around the tokenizer; tests check that both give the same segments."""
        pairs = [(m["role"], m["content"]) for m in messages]
        if self.default_system is not None and (not pairs or pairs[0][0] != "system"):
            pairs.insert(0, ("system", self.default_system))
        if self.system_mode == "merge_user" and pairs and pairs[0][0] == "system":
            system = pairs.pop(0)[1]
            j = next((i for i, (role, _) in enumerate(pairs) if role == "user"), None)
            if j is not None and system:  # an empty system adds nothing (as mistral-common)
                pairs[j] = ("user", f"{system}\n\n{pairs[j][1]}")
        last = -1
        if train_on == "last_assistant":
            last = max((i for i, (role, _) in enumerate(pairs) if role == "assistant"), default=-1)
        literal = self.literal_content
        after = self._separator(train_on == "all")
        parts = self._parts
        segments: list[Segment] = []
        append = segments.append
        for i, (role, content) in enumerate(pairs):
            prefix, lead, kind, strip, chars, trained, suffix, untrained_suffix = parts.get(
                (role, train_on)
            ) or self._role_parts(role, train_on)
            if i == last:
                trained = True
            if prefix is not None:
                append(prefix)
            if strip:
                content = content.rstrip(chars)
            content = lead + content
            if content:
                append(Segment(content, trained, literal, kind))
            if suffix is not None:
                append(suffix if trained else untrained_suffix)
            if after is not None:
                append(after)
        return segments

    def _separator(self, every: bool) -> Segment | None:
        key = ("", "separator", every)  # beside the (role, train_on) entries of `_role_parts`
        if key not in self._parts:
            separator = self._fill(self.separator)
            self._parts[key] = Segment(separator, every) if separator else None
        return self._parts[key]

    def _render(self, messages: Sequence[dict], train_on: str = "all_assistant") -> list[Segment]:
        """Any conversation: tools, tool calls, reasoning."""
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
            schemas = []
            if tools and i == first_user:  # schemas go with the first user turn, as system messages do
                schemas = [
                    Segment(fmt.tools_open, every, kind="tools"),
                    Segment(fmt.schemas(tools), every, literal=self.literal_content, kind="tools"),
                    Segment(fmt.tools_close, every, kind="tools"),
                ]
            markup = "tool_result" if role == "tool" else "text"
            if fmt is None or not fmt.schemas_in_user:
                segments += schemas
                schemas = []
            segments.append(Segment(self._prefix(role), every, kind=markup))
            segments += schemas
            lead = self._fill(self.leads.get(role, ""))
            if role == "assistant" and REASONING_KEY in m:
                # The lead (Mistral's space) goes before the block, the answer follows the block directly.
                segments += self._reasoning(lead, m[REASONING_KEY], trained)
                lead = ""
            if role == "assistant" and m.get("tool_calls"):
                if m["content"]:
                    raise DataError(
                        f"template={self.name}: an assistant turn has both content and tool_calls; this "
                        "model writes one or the other. Split it into two assistant turns."
                    )
                segments.append(Segment(fmt.calls_open, trained, kind="tool_call"))
                segments.append(
                    Segment(
                        fmt.calls(m["tool_calls"]), trained, literal=self.literal_content, kind="tool_call"
                    )
                )
            else:
                content = fmt.result(m) if fmt and role == "tool" else m["content"]
                content = content.rstrip(self.rstrip[role]) if role in self.rstrip else content
                segments.append(Segment(lead + content, trained, literal=self.literal_content, kind=markup))
            suffix = self._suffix(role)
            if role == "assistant" and m.get("tool_calls") and fmt.calls_end is not None:
                suffix = fmt.calls_end
            segments.append(Segment(suffix, trained, kind=markup))
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
            # History as data.reasoning=keep_last trains it: a client that sends an earlier answer with its
            # reasoning inline gets it dropped, as Qwen3's and DeepSeek-R1's templates drop it.
            "{%- if m['role'] == 'assistant' and " + j(THINK_CLOSE) + " in content -%}"
            "{%- set content = content.split(" + j(THINK_CLOSE) + ")[-1].lstrip('\\n') -%}{%- endif -%}"
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
    A Jinja with `{% generation %}` markers gives the mask itself (`return_assistant_tokens_mask`); it is
    used after a check against the prefix diff (`_check_markers`). Kept reasoning reaches the Jinja as
    `reasoning_content` and must appear in its text. The Jinja usually writes BOS itself: `bos` stays false.
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

    def _response_end(self, upto: str, start: int, content: str, reasoning: str | None = None) -> int:
        """End of the trained span: the response content plus the end-of-turn token that follows it."""
        if reasoning:  # the answer comes after the reasoning, which may hold any text
            start = upto.index(reasoning, start) + len(reasoning)
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
            reasoning = m.get(REASONING_KEY)
            if reasoning and reasoning not in full:
                raise DataError(
                    f"template=tokenizer: this chat template does not render assistant turn {i}'s reasoning "
                    f"({REASONING_KEY}), so it would be dropped silently. Use data.reasoning=drop, a "
                    "template that renders reasoning (e.g. Qwen3's), or a named template."
                )
            prompt = self._apply(msgs[:i], True, tools)
            upto = full if i == len(msgs) - 1 else self._apply(msgs[: i + 1], False, tools)
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise DataError(
                    f"template=tokenizer: rendering assistant turn {i} does not extend the earlier turns "
                    "(it rewrites history, e.g. drops reasoning), so the training prompt would differ "
                    "from the inference prompt. Use a named template, or a training variant of this Jinja "
                    "that keeps history as is (template.chat_template=...)."
                )
            end = self._response_end(upto, len(prompt), m["content"], reasoning)
            if end <= len(prompt):
                raise DataError(
                    f"template=tokenizer: assistant turn {i} has no text of its own after the generation "
                    "prompt, so nothing could be trained. Use a named template."
                )
            spans.append((i, len(prompt), end))
        if self.has_generation_markers():
            spans = self._check_markers(msgs, tools, full, spans)
        return full, spans

    def has_generation_markers(self) -> bool:
        return bool(GENERATION_TAG.search(self.to_jinja()))

    def _marked(self, msgs: Sequence[dict], tools: list[dict] | None, full: str) -> list[tuple[int, int]]:
        """Character spans of the tokens `apply_chat_template(return_assistant_tokens_mask=True)` marks."""
        out = self.tokenizer.apply_chat_template(
            list(msgs),
            tools=tools,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            chat_template=self.chat_template,
        )
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) != list(out["input_ids"]):
            raise DataError("template=tokenizer: the marked rendering differs from the plain rendering.")
        runs: list[list[int]] = []
        previous = False
        for marked, (a, b) in zip(out["assistant_masks"], enc["offset_mapping"], strict=True):
            if marked and previous:
                runs[-1][1] = b
            elif marked:
                runs.append([a, b])
            previous = bool(marked)
        return [(a, b) for a, b in runs]

    def _check_markers(
        self, msgs: Sequence[dict], tools: list[dict] | None, full: str, spans: list[tuple[int, int, int]]
    ) -> list[tuple[int, int, int]]:
        """The template's own `{% generation %}` spans, after checking them against the prefix-diff spans.

        They must start where the generation prompt ends (else training and inference prompts differ) and
        end where the prefix-diff span ends, up to whitespace (Qwen3's training template marks the newline
        after `<|im_end|>` too). Any other difference is an error: one of the two methods is wrong for this
        template, and guessing which would train the wrong tokens."""
        marked = self._marked(msgs, tools, full)

        def show(a: int, b: int) -> str:
            return repr(full[a:b] if b - a < 80 else full[a : a + 38] + "…" + full[b - 38 : b])

        if len(marked) != len(spans):
            raise DataError(
                f"template=tokenizer: the chat template's {{% generation %}} markers cover {len(marked)} "
                f"span(s) but the conversation has {len(spans)} assistant turn(s) "
                f"(marked: {', '.join(show(a, b) for a, b in marked) or 'nothing'}). Fix the markers or "
                "set template.chat_template to a template without them."
            )
        out = []
        for (i, start, end), (a, b) in zip(spans, marked, strict=True):
            if a != start or full[min(b, end) : max(b, end)].strip():
                raise DataError(
                    f"template=tokenizer: for assistant turn {i} the chat template's {{% generation %}} mask "
                    f"trains {show(a, b)}, but the generation prompt and end-of-turn token give "
                    f"{show(start, end)}. Fix the markers or set template.chat_template to a template "
                    "without them."
                )
            out.append((i, a, b))
        return out

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

    def _reasoning(self, lead: str, reasoning: str, trained: bool) -> list[Segment]:
        return reasoning_segments(self.think_open, self.think_close, lead, reasoning, trained, literal=True)

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
