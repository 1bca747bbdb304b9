"""A small evaluator of Go `text/template` for the subset an Ollama TEMPLATE uses, to test sftlab's Modelfile.

No Python library renders Go templates, and Go is not installed here. Supported, with Go's semantics: literal
text, `{{- ` / ` -}}` whitespace trimming, `range` (with `else` for an empty list), `if` / `else if` / `else`,
`end`, fields of the dot (`.Messages`, `.Role`, `.Content`), string literals, variables (`$x := v`, `$x = v`,
assignment reaching the variable of the enclosing scope as in Go >= 1.11), and the functions `eq`, `ne`,
`not`, `and`, `or`. Truthiness is Go's: empty string, empty list, false and nil are false. Else: it raises.
"""

from __future__ import annotations

import json
import re
from typing import Any

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\(|\)|[^\s()]+')


def _lex(src: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    for m in ACTION.finditer(src):
        text = src[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        if out and out[-1][0] == "trim":
            text = text.lstrip()
            out.pop()
        out.append(("text", text))
        out.append(("action", m.group(2)))
        if m.group(3):
            out.append(("trim", ""))
        pos = m.end()
    text = src[pos:]
    if out and out[-1][0] == "trim":
        text = text.lstrip()
        out.pop()
    out.append(("text", text))
    return out


def _parse(items: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list, int, str]:
    """Nodes until an action starting with one of `stop`; returns (nodes, next index, the stop action)."""
    nodes: list = []
    while i < len(items):
        kind, body = items[i]
        i += 1
        if kind == "text":
            if body:
                nodes.append(("text", body))
            continue
        word = body.split(None, 1)[0] if body else ""
        if word in stop or body in stop:
            return nodes, i, body
        if word in ("if", "range"):
            branches, cond = [], body[len(word) :].strip()
            while True:
                inner, i, end = _parse(items, i, ("else", "end"))
                branches.append((cond, inner))
                if end == "end":
                    break
                cond = end[len("else") :].strip().removeprefix("if").strip() or None
            nodes.append((word, branches))
        else:
            nodes.append(("expr", body))
    if stop:
        raise ValueError(f"template ends inside a block (expected {stop})")
    return nodes, i, ""


def _truthy(v: Any) -> bool:
    return v not in (None, False, "", 0) and not (isinstance(v, list | dict) and not v)


class _Scope:
    def __init__(self, parent: _Scope | None = None) -> None:
        self.vars: dict[str, Any] = {}
        self.parent = parent

    def find(self, name: str) -> _Scope:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.vars:
                return scope
            scope = scope.parent
        raise NameError(f"undefined variable {name}")


FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truthy(a),
    "and": lambda *xs: next((x for x in xs if not _truthy(x)), xs[-1]),
    "or": lambda *xs: next((x for x in xs if _truthy(x)), xs[-1]),
}


def _value(tokens: list[str], dot: Any, scope: _Scope) -> Any:
    def atom(k: int) -> tuple[Any, int]:
        t = tokens[k]
        if t == "(":
            depth, j = 1, k + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[j], 0)
                j += 1
            return _value(tokens[k + 1 : j - 1], dot, scope), j
        if t.startswith('"'):
            return json.loads(t), k + 1
        if t == ".":
            return dot, k + 1
        if t.startswith("."):
            v = dot
            for part in t[1:].split("."):
                v = v[part] if isinstance(v, dict) else getattr(v, part)
            return v, k + 1
        if t.startswith("$"):
            return scope.find(t).vars[t], k + 1
        raise ValueError(f"unsupported token {t!r}")

    if tokens[0] in FUNCS:
        args, k = [], 1
        while k < len(tokens):
            v, k = atom(k)
            args.append(v)
        return FUNCS[tokens[0]](*args)
    v, k = atom(0)
    if k != len(tokens):
        raise ValueError(f"unsupported expression {' '.join(tokens)!r}")
    return v


def _run(nodes: list, dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "expr":
            tokens = TOKEN.findall(node[1])
            if len(tokens) > 2 and tokens[1] in (":=", "="):
                value = _value(tokens[2:], dot, scope)
                target = scope if tokens[1] == ":=" else scope.find(tokens[0])
                target.vars[tokens[0]] = value
            else:
                value = _value(tokens, dot, scope)
                out.append("" if value is None else str(value))
        elif kind == "if":
            for cond, body in node[1]:
                if cond is None or _truthy(_value(TOKEN.findall(cond), dot, scope)):
                    _run(body, dot, _Scope(scope), out)
                    break
        elif kind == "range":
            (expr, body), *rest = node[1]
            items = _value(TOKEN.findall(expr), dot, scope) or []
            for item in items:
                _run(body, item, _Scope(scope), out)
            if not items and rest:
                _run(rest[0][1], dot, _Scope(scope), out)


def render(template: str, data: dict) -> str:
    """`template` executed with `data` as the dot, as Go's text/template would."""
    nodes, _, _ = _parse(_lex(template), 0, ())
    out: list[str] = []
    _run(nodes, data, _Scope(), out)
    return "".join(out)
