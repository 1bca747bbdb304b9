"""An Ollama `Modelfile` for an exported GGUF: FROM the file, the training template as a Go TEMPLATE, stops.

Ollama does not run the Jinja chat template stored in the GGUF; it renders its own Go `text/template` over
`.Messages`. The TEMPLATE is generated from the run's role-tagged template (prefix + lead + content + suffix +
separator per message, then the assistant prefix), so `ollama run` prompts the model exactly as training
rendered it (a test renders it with Go-template semantics and compares it with the training text). A template
without a system role (`system_mode: merge_user`, Mistral) carries the system text into the next user turn
with a template variable, as training does. Not expressible in the TEMPLATE and said in docs/export.md:
tool schemas / calls, and `rstrip` of trailing characters. `default_system` becomes Ollama's `SYSTEM`, which
Ollama inserts as the first message when a request has none, as the training template does.
"""

from __future__ import annotations

import json
from typing import Any

from sftlab.errors import ConfigError


def _lit(text: str) -> str:
    """Literal template text; `{{` would open an action, so it is emitted as a quoted Go string."""
    return text.replace("{{", '{{ "{{" }}')


ROLES = ("system", "user", "assistant", "tool")


def _turn(template: Any, role: str | None, content: str) -> str:
    """One message: prefix, lead, content, suffix, separator (role None: other roles, `default` strings)."""
    fill, key = template._fill, role or "default"
    prefix = _lit(fill(template.prefixes.get(key, template.prefixes.get("default", ""))))
    prefix = prefix.replace("{role}", role or "{{ .Role }}")
    suffix = fill(template.suffixes.get(key, template.suffixes.get("default", "")))
    lead = fill(template.leads.get(role, "")) if role else ""
    return f"{prefix}{_lit(lead)}{content}{_lit(suffix)}{_lit(fill(template.separator))}"


def go_template(template: Any) -> str:
    """The Ollama TEMPLATE equivalent to `template.render` + `generation_prompt` of `.Messages`."""
    if not hasattr(template, "prefixes"):
        raise ConfigError(
            "format=gguf: template=tokenizer (the tokenizer's own Jinja template) cannot be turned into an "
            "Ollama TEMPLATE; the GGUF file still carries it as tokenizer.chat_template for llama.cpp."
        )
    merge = template.system_mode == "merge_user"
    branches = []
    for role in ROLES:
        if merge and role == "system":
            body = "{{ $system = .Content }}"
        elif merge and role == "user":
            carried = '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ .Content }}'
            body = _turn(template, role, carried)
        else:
            body = _turn(template, role, "{{ .Content }}")
        branches.append(f'{{{{ {"else if" if branches else "if"} eq .Role "{role}" }}}}{body}')
    fallback = _turn(template, None, "{{ .Content }}")
    loop = "{{ range .Messages }}" + "".join(branches) + "{{ else }}" + fallback + "{{ end }}{{ end }}"
    generation = _lit(
        template._fill(template.prefixes.get("assistant", template.prefixes.get("default", "")))
    )
    return ('{{ $system := "" }}' if merge else "") + loop + generation.replace("{role}", "assistant")


def modelfile(gguf_name: str, template: Any, stops: list[str]) -> str:
    """The Modelfile text: `ollama create NAME -f Modelfile` in the export directory needs no editing."""
    text = go_template(template)
    if '"""' in text:
        raise ConfigError('format=gguf: the template contains """, which an Ollama TEMPLATE cannot hold.')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{text}"""']
    if template.default_system is not None:
        lines.append(f'SYSTEM """{template.default_system}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"
