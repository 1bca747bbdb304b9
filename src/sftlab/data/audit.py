"""The data audit: what a dataset holds before it trains, as pure functions over conversations.

Per split: size and shape (rows, messages, roles, prompt / response / example tokens with the run's template
and tokenizer, the forecast of `data.max_length`, the token budget of an epoch); exact and near duplicates;
prompts of validation/test that also appear in train (contamination); the same prompt with different
responses (conflicts); quality flags (short responses, refusals, heavy repetition, invisible characters,
echoed prompts); and the diversity of instruction kinds. Near-duplicate candidates come from MinHash LSH
(`datasketch`) and each candidate pair is then checked with its true Jaccard similarity, so nothing below
`near_threshold` is ever reported; LSH may miss a pair just above it with a small probability.

Definitions (docs/data-audit.md has them with an example):
  * duplicates: rows whose conversation equals an earlier row's (what `data.dedupe=true` drops);
  * near_duplicates: rows, not exact duplicates, whose text (all messages, lower-cased word `shingle`-grams)
    has Jaccard similarity >= `near_threshold` with an earlier row of the split;
  * contamination: val/test rows whose prompt equals a train row's prompt (lower-cased, punctuation
    dropped: the question was seen in training) or whose text near-duplicates a train row's (the example
    was seen, reworded). Near on the whole text, not the prompt alone: templated prompts that differ in one
    value ("Convert this date ...: 11 December 2007" / "... 2040") are different tasks;
  * conflicts: rows whose prompt (every message before the last assistant turn) is shared with a row that
    has a different last response.

`checks` holds one number per check and split, the thing `fail_on` thresholds test: every check is a
fraction of the split's rows except `rows` (a count) and `kind_entropy` (normalized, 0..1).
"""

from __future__ import annotations

import json
import math
import operator
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sftlab.data.formats import BadRow, Conversation, split_prompt, to_messages
from sftlab.data.pipeline import split_off
from sftlab.data.quality import (
    REFUSAL_PHRASES,
    instruction_kind,
    is_echo,
    is_refusal,
    markers_in,
    repeated_ngram_rate,
    special_strings,
    suspect_characters,
    words,
)
from sftlab.data.sources import Source, read_source, weigh
from sftlab.data.tokenize import Template, encode_rows
from sftlab.errors import ConfigError

FLAGS = ("short", "refusals", "repetitive", "control_chars", "echoes", "chat_markers")
CHECKS = (
    "rows",
    "bad_rows",
    "duplicates",
    "near_duplicates",
    "contamination",
    "conflicts",
    *FLAGS,
    "truncated",
    "dropped",
    "top_kind_share",
    "kind_entropy",
)
OPERATORS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq}
_CHECK = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass
class AuditSettings:
    """`audit.*` in conf/data_audit.yaml. `fail_on`: checks such as `contamination>0` or `duplicates>0.05`
    (names in CHECKS; operators > >= < <= ==); any that holds for any split fails the audit."""

    fail_on: list[str] = field(default_factory=list)
    near_threshold: float = 0.8
    num_perm: int = 128
    shingle: int = 3
    short_response_chars: int = 3
    repetition_ngram: int = 3
    repetition_threshold: float = 0.2
    echo_threshold: float = 0.9
    refusal_phrases: list[str] = field(default_factory=lambda: list(REFUSAL_PHRASES))
    top_kinds: int = 20
    max_listed: int = 50  # offending rows / pairs / groups listed per finding (counts are always complete)

    def __post_init__(self) -> None:
        parse_checks(self.fail_on, "audit.fail_on")
        if not 0 < self.near_threshold <= 1:
            raise ConfigError(
                f"audit.near_threshold={self.near_threshold}: use a Jaccard similarity in (0, 1]."
            )
        if self.shingle < 1 or self.num_perm < 2:
            raise ConfigError("audit.shingle must be >= 1 and audit.num_perm >= 2.")


@dataclass(frozen=True)
class Item:
    where: str  # file:line of the row
    conversation: Conversation


@dataclass
class SplitRows:
    items: list[Item]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file:line, reason) of unusable rows


@dataclass
class AuditResult:
    report: dict[str, Any]  # JSON-ready: audit.json
    lengths: dict[str, list[int]]  # tokens per example of each split (untruncated), for the plots
    failures: list[str]  # the fail_on checks that hold, with the split and value


# ---- reading ---------------------------------------------------------------------------------------------
def read_splits(
    sources: dict[str, list[Source]],
    fmt: str | None,
    fields: dict[str, str],
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, SplitRows]:
    """Rows of every split as the training pipeline reads them, each with its file:line; bad rows are
    collected (an audit reports them rather than stopping). Without a val source, `val_fraction` is held
    out of train with the training pipeline's seeded split."""
    out: dict[str, SplitRows] = {}
    for split, srcs in sources.items():
        if not srcs:
            continue
        rows = []
        for k, src in enumerate(srcs):
            rows += weigh(read_source(src, f"data.{split}_path", split), src.weight, seed + k)
        split_rows = SplitRows([])
        for where, row in rows:
            try:
                if isinstance(row, BadRow):
                    raise row
                split_rows.items.append(Item(where, to_messages(row, fmt, where, fields)))
            except BadRow as err:
                split_rows.bad.append((where, err.reason))
        out[split] = split_rows
    if "val" not in out and val_fraction > 0 and "train" in out:
        train, val = split_off(out["train"].items, val_fraction, seed)
        out["train"].items, out["val"] = train, SplitRows(val)
    return out


# ---- views of a conversation -----------------------------------------------------------------------------
@dataclass(frozen=True)
class View:
    prompt_key: str | None  # every message before the last assistant turn, exactly (None: a document)
    prompt: str  # the user-side text of that prompt (a document: its text)
    response: str
    text: str  # every message's content
    turns: list[tuple[str, str]]  # (the message before an assistant turn, the turn) for each assistant turn
    kind: str


def view(conv: Conversation) -> View:
    if isinstance(conv, str):
        return View(None, conv, conv, conv, [], "")
    history, response = split_prompt(conv)
    prompt = "\n".join(m["content"] for m in history if m["role"] != "system")
    turns = [
        (conv[i - 1]["content"] if i else "", m["content"])
        for i, m in enumerate(conv)
        if m["role"] == "assistant"
    ]
    first_user = next((m["content"] for m in conv if m["role"] == "user"), "")
    return View(
        json.dumps(history, sort_keys=True, ensure_ascii=False),
        prompt,
        response,
        "\n".join(m["content"] for m in conv),
        turns,
        instruction_kind(first_user),
    )


def conversation_key(conv: Conversation) -> str:
    return json.dumps(conv, sort_keys=True, ensure_ascii=False)


# ---- near duplicates -------------------------------------------------------------------------------------
def shingles(text: str, n: int) -> set[bytes]:
    """Lower-case word n-grams; a text shorter than n words is one shingle; no words, no shingles."""
    ws = words(text)
    if len(ws) < n:
        return {" ".join(ws).encode()} if ws else set()
    return {" ".join(ws[i : i + n]).encode() for i in range(len(ws) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


@dataclass
class Signatures:
    """The word-shingle sets of a split's texts and their MinHashes, computed once per split and used for
    near duplicates within it and contamination across splits."""

    sets: list[set[bytes]]
    hashes: list

    @classmethod
    def of(cls, texts: Sequence[str], shingle: int, num_perm: int) -> Signatures:
        from datasketch import MinHash

        sets = [shingles(t, shingle) for t in texts]
        # crc32, not the default SHA-1: MinHash keeps 32 bits of a hash anyway, and crc32 is much faster.
        return cls(sets, MinHash.bulk(sets, num_perm=num_perm, hashfunc=zlib.crc32))


def _lsh(threshold: float, num_perm: int):
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=threshold, num_perm=num_perm)


def near_pairs_within(
    sig: Signatures, indices: Sequence[int], threshold: float, num_perm: int
) -> tuple[list[tuple[int, int, float]], Any]:
    """(earlier j, later i, Jaccard) among `indices` for every pair the LSH proposes whose true similarity
    is >= threshold; and the LSH index of `indices`, for queries from other splits."""
    lsh, pairs = _lsh(threshold, num_perm), []
    for i in indices:
        if not sig.sets[i]:
            continue
        for j in lsh.query(sig.hashes[i]):
            sim = jaccard(sig.sets[i], sig.sets[j])
            if sim >= threshold:
                pairs.append((j, i, sim))
        lsh.insert(i, sig.hashes[i], check_duplication=False)
    return sorted(pairs), lsh


def near_matches(
    queries: Signatures, index: Signatures, lsh: Any, threshold: float
) -> dict[int, tuple[int, float]]:
    """For each query with a near match in `lsh` (an index of `index` entries): (the most similar entry,
    its Jaccard)."""
    out: dict[int, tuple[int, float]] = {}
    for i, m in enumerate(queries.hashes):
        if not queries.sets[i]:
            continue
        scored = [(jaccard(queries.sets[i], index.sets[j]), -j) for j in lsh.query(m)]
        best = max((sc for sc in scored if sc[0] >= threshold), default=None)
        if best is not None:
            out[i] = (-best[1], best[0])
    return out


# ---- the parts of a split's report -----------------------------------------------------------------------
def _stats(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    arr = np.asarray(values)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99], method="nearest")
    return {
        "n": len(values),
        "min": int(arr.min()),
        "mean": round(float(arr.mean()), 2),
        "p50": int(p50),
        "p90": int(p90),
        "p99": int(p99),
        "max": int(arr.max()),
        "total": int(arr.sum()),
    }


def shape(items: Sequence[Item], views: Sequence[View]) -> dict[str, Any]:
    roles: Counter = Counter()
    messages, assistant_turns = [], []
    for it, v in zip(items, views, strict=True):
        if isinstance(it.conversation, str):
            roles["document"] += 1
            messages.append(1)
            assistant_turns.append(0)
        else:
            roles.update(m["role"] for m in it.conversation)
            messages.append(len(it.conversation))
            assistant_turns.append(len(v.turns))
    return {
        "messages": _stats(messages),
        "assistant_turns": _stats(assistant_turns),
        "roles": dict(sorted(roles.items())),
    }


def tokens(
    conversations: Sequence[Conversation],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None,
    truncation: str,
    train_on: str,
    batch_size: int,
    reasoning: str = "keep_last",
) -> tuple[dict[str, Any], list[int]]:
    """Token counts with the run's template and tokenizer, what `max_length` will do, and an epoch's budget.
    Prompt tokens are the untrained ones, response tokens the trained ones (as `train_on` decides)."""
    full = encode_rows(conversations, template, tokenizer, train_on=train_on, reasoning=reasoning)
    fitted = full.fit(max_length, truncation)
    usable = full.kept  # the others have nothing to train on even untruncated
    lengths = full.lengths[usable].tolist()
    response = full.num_targets()[usable].tolist()
    prompt = [n - r for n, r in zip(lengths, response, strict=True)]
    forecast = fitted.statuses()
    budget_tokens, budget_targets = int(fitted.lengths.sum()), int(fitted.num_targets().sum())
    kept = forecast["kept"] + forecast["truncated"]
    histogram_top = max([*lengths, max_length or 0, 1])
    counts, edges = np.histogram(lengths, bins=30, range=(0, histogram_top))
    return {
        "prompt": _stats(prompt),
        "response": _stats(response),
        "example": _stats(lengths),
        "max_length": max_length,
        "truncation": truncation,
        "over_max_length": sum(n > max_length for n in lengths) if max_length else 0,
        "forecast": {
            "kept": forecast["kept"],
            "truncated": forecast["truncated"],
            "dropped": {k: n for k, n in sorted(forecast.items()) if k not in ("kept", "truncated")},
        },
        "epoch": {
            "examples": kept,
            "tokens": budget_tokens,
            "target_tokens": budget_targets,
            "batches": math.ceil(kept / batch_size) if batch_size else None,
        },
        "histogram": {"edges": [round(float(x), 1) for x in edges], "counts": counts.tolist()},
    }, lengths


def _listed(findings: list, limit: int) -> dict[str, Any]:
    return {"listed": findings[:limit], "not_listed": max(0, len(findings) - limit)}


def duplicates(items: Sequence[Item], sig: Signatures, s: AuditSettings) -> tuple[dict[str, Any], Any]:
    """Exact duplicates, then near duplicates among the first occurrences, within a split; and the LSH index
    of those first occurrences (contamination queries it: a duplicate's text is its first occurrence's)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[conversation_key(it.conversation)].append(i)
    dup_groups = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
    pairs, lsh = near_pairs_within(sig, [g[0] for g in groups.values()], s.near_threshold, s.num_perm)
    listed_pairs = [
        {"earlier": items[j].where, "row": items[i].where, "similarity": round(sim, 4)}
        for j, i, sim in sorted(pairs, key=lambda p: (-p[2], p[1], p[0]))
    ]
    return {
        "exact": {
            "rows": sum(len(g) - 1 for g in dup_groups),
            "groups": len(dup_groups),
            **_listed([[items[i].where for i in g] for g in dup_groups], s.max_listed),
        },
        "near": {
            "rows": len({i for _, i, _ in pairs}),
            "pairs": len(pairs),
            **_listed(listed_pairs, s.max_listed),
        },
    }, lsh


def contamination(
    train: tuple[Sequence[Item], Sequence[View], Signatures, Any],
    other: tuple[Sequence[Item], Sequence[View], Signatures],
    s: AuditSettings,
) -> dict[str, Any]:
    """Rows of `other` whose prompt is a train row's prompt (lower-cased, punctuation dropped) or whose text
    near-duplicates a train row's, each with the train row it matches."""
    (t_items, t_views, t_sig, t_lsh), (o_items, o_views, o_sig) = train, other
    norm = lambda v: " ".join(words(v.prompt))  # noqa: E731
    same_prompt: dict[str, int] = {}
    for j, v in enumerate(t_views):
        same_prompt.setdefault(norm(v), j)
    near = near_matches(o_sig, t_sig, t_lsh, s.near_threshold)
    leaks = []
    for i, v in enumerate(o_views):
        key = norm(v)
        if key and key in same_prompt:
            leaks.append((i, same_prompt[key], "same prompt"))
        elif i in near:
            j, sim = near[i]
            leaks.append((i, j, f"similarity {sim:.4f}"))
    listed = [{"row": o_items[i].where, "train": t_items[j].where, "match": how} for i, j, how in leaks]
    return {
        "rows": len(leaks),
        "same_prompt": sum(how == "same prompt" for *_, how in leaks),
        **_listed(listed, s.max_listed),
    }


def conflicts(items: Sequence[Item], views: Sequence[View], s: AuditSettings) -> dict[str, Any]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, v in enumerate(views):
        if v.prompt_key is not None:
            groups[v.prompt_key].append(i)
    found = [g for g in groups.values() if len({views[i].response for i in g}) > 1]
    listed = [
        {
            "prompt": _preview(views[g[0]].prompt),
            "responses": [{"row": items[i].where, "response": _preview(views[i].response)} for i in g],
        }
        for g in found
    ]
    return {"prompts": len(found), "rows": sum(len(g) for g in found), **_listed(listed, s.max_listed)}


def flags(
    items: Sequence[Item], views: Sequence[View], s: AuditSettings, markers: Sequence[str] = ()
) -> dict[str, Any]:
    """Rows each quality flag holds for. `markers`: the tokenizer's special-token strings; a row whose
    content holds one is flagged `chat_markers` (text under template.content_markers=text, a control token
    under =special: either way worth a look)."""
    phrases = [p.lower() for p in s.refusal_phrases]
    found: dict[str, list[dict]] = {name: [] for name in FLAGS}
    for it, v in zip(items, views, strict=True):
        responses = [r for _, r in v.turns] or [v.response]
        chars = suspect_characters(v.text)

        def add(name: str, detail: str, where: str = it.where) -> None:
            found[name].append({"row": where, "detail": detail})

        if v.turns and (short := [r for r in responses if len(r.strip()) < s.short_response_chars]):
            add("short", repr(short[0]))
        if v.turns and (refused := [r for r in responses if is_refusal(r, phrases)]):
            add("refusals", _preview(refused[0]))
        rates = [repeated_ngram_rate(r, s.repetition_ngram) for r in responses]
        if max(rates) > s.repetition_threshold:
            add("repetitive", f"repeated {s.repetition_ngram}-gram rate {max(rates):.2f}")
        if chars:
            add("control_chars", " ".join(chars))
        if any(is_echo(p, r, s.echo_threshold) for p, r in v.turns):
            add("echoes", _preview(v.response))
        if found_markers := markers_in(v.text, markers):
            add("chat_markers", " ".join(found_markers))
    return {name: {"rows": len(rows), **_listed(rows, s.max_listed)} for name, rows in found.items()}


def diversity(views: Sequence[View], top: int) -> dict[str, Any]:
    """Instruction kinds (leading verb or question word of the first user message) and how concentrated
    they are: the share of the most common kind and the Shannon entropy normalized by its maximum."""
    kinds = Counter(v.kind for v in views if v.kind)
    n = sum(kinds.values())
    if not n:
        return {"kinds": 0, "top": [], "top_share": 0.0, "top10_share": 0.0, "entropy": 0.0}
    probs = np.array(list(kinds.values())) / n
    entropy = float(-(probs * np.log(probs)).sum() / math.log(len(kinds))) if len(kinds) > 1 else 0.0
    common = kinds.most_common()
    return {
        "kinds": len(kinds),
        "top": [{"kind": k, "rows": c, "share": round(c / n, 4)} for k, c in common[:top]],
        "top_share": common[0][1] / n,
        "top10_share": sum(c for _, c in common[:10]) / n,
        "entropy": round(entropy, 4),
    }


def _preview(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- the whole audit -------------------------------------------------------------------------------------
def audit_splits(
    splits: dict[str, SplitRows],
    template: Template,
    tokenizer: PreTrainedTokenizerBase,
    settings: AuditSettings,
    *,
    max_length: int | None,
    truncation: str = "truncate",
    train_on: str = "all_assistant",
    reasoning: str = "keep_last",
    batch_size: int = 8,
) -> AuditResult:
    views = {name: [view(it.conversation) for it in sr.items] for name, sr in splits.items()}
    sigs = {
        name: Signatures.of([v.text for v in vs], settings.shingle, settings.num_perm)
        for name, vs in views.items()
    }
    report: dict[str, Any] = {
        "settings": settings.__dict__ | {"refusal_phrases": len(settings.refusal_phrases)}
    }
    dups, lshs = {}, {}
    for name, sr in splits.items():
        dups[name], lshs[name] = duplicates(sr.items, sigs[name], settings)
    report["splits"], lengths = {}, {}
    for name, sr in splits.items():
        items, vs = sr.items, views[name]
        token_report, lengths[name] = tokens(
            [it.conversation for it in items],
            template,
            tokenizer,
            max_length=max_length,
            truncation=truncation,
            train_on=train_on,
            reasoning=reasoning,
            batch_size=batch_size,
        )
        report["splits"][name] = {
            "rows": len(items),
            "bad_rows": {
                "rows": len(sr.bad),
                "reasons": dict(sorted(Counter(r for _, r in sr.bad).items())),
                **_listed([{"row": w, "reason": r} for w, r in sr.bad], settings.max_listed),
            },
            "shape": shape(items, vs),
            "tokens": token_report,
            "duplicates": dups[name],
            "conflicts": conflicts(items, vs, settings),
            "flags": flags(items, vs, settings, special_strings(tokenizer)),
            "diversity": diversity(vs, settings.top_kinds),
        }
        if name != "train" and "train" in splits:
            report["splits"][name]["contamination"] = contamination(
                (splits["train"].items, views["train"], sigs["train"], lshs["train"]),
                (items, vs, sigs[name]),
                settings,
            )
    report["checks"] = check_values(report["splits"])
    failures = evaluate(settings.fail_on, report["checks"])
    report["fail_on"] = {"checks": list(settings.fail_on), "failed": failures}
    return AuditResult(report, lengths, failures)


def check_values(splits: dict[str, dict]) -> dict[str, dict[str, float]]:
    """The number each `fail_on` check tests, per split."""
    out: dict[str, dict[str, float]] = {name: {} for name in CHECKS}
    for name, r in splits.items():
        rows = r["rows"]
        frac = lambda n, rows=rows: n / rows if rows else 0.0  # noqa: E731
        out["rows"][name] = rows
        read = rows + r["bad_rows"]["rows"]
        out["bad_rows"][name] = r["bad_rows"]["rows"] / read if read else 0.0
        out["duplicates"][name] = frac(r["duplicates"]["exact"]["rows"])
        out["near_duplicates"][name] = frac(r["duplicates"]["near"]["rows"])
        if "contamination" in r:
            out["contamination"][name] = frac(r["contamination"]["rows"])
        out["conflicts"][name] = frac(r["conflicts"]["rows"])
        for flag in FLAGS:
            out[flag][name] = frac(r["flags"][flag]["rows"])
        forecast = r["tokens"]["forecast"]
        out["truncated"][name] = frac(forecast["truncated"])
        out["dropped"][name] = frac(sum(forecast["dropped"].values()))
        out["top_kind_share"][name] = r["diversity"]["top_share"]
        out["kind_entropy"][name] = r["diversity"]["entropy"]
    return out


def parse_checks(checks: Sequence[str], key: str) -> list[tuple[str, str, float]]:
    """`contamination>0` -> ("contamination", ">", 0.0); a ConfigError names every malformed check."""
    parsed, problems = [], []
    for check in checks:
        m = _CHECK.match(str(check))
        if not m or m.group(1) not in CHECKS:
            problems.append(str(check))
            continue
        parsed.append((m.group(1), m.group(2), float(m.group(3))))
    if problems:
        raise ConfigError(
            f"{key}: cannot read {problems}; write NAME OP NUMBER, e.g. contamination>0 or "
            f"duplicates>0.05, with NAME one of {', '.join(CHECKS)} and OP one of {' '.join(OPERATORS)}."
        )
    return parsed


def evaluate(checks: Sequence[str], values: dict[str, dict[str, float]]) -> list[str]:
    """The checks that hold, each as `check: split = value`."""
    failed = []
    for check, (name, op, threshold) in zip(checks, parse_checks(checks, "audit.fail_on"), strict=True):
        for split, value in values[name].items():
            if OPERATORS[op](value, threshold):
                failed.append(f"{check}: {split} = {value:.4g}")
    return failed
