"""Figures from the runners' records: per-run summary, the issue's targets, and the printed table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from sftlab.bench.hardware import FlopModel
from sftlab.bench.scale import render_table
from sftlab.bench.stats import Record, Step, median_rate, padding_efficiency, ratio, steady

# (what, numerator run, denominator run, threshold): "sftlab >= threshold x peer", as ratios from one run.
RATIO_TARGETS = (
    ("sftlab / TRL defaults", "iso/sftlab", "iso/trl-default", 1.5),
    ("sftlab / TRL best", "iso/sftlab", "iso/trl-best", 1.2),
    ("sftlab / bare loop", "iso/sftlab", "iso/bare", 0.95),
    ("sftlab packed / TRL defaults (varied)", "varied/sftlab-packed", "varied/trl-default", 1.5),
    ("sftlab packed / TRL best (varied)", "varied/sftlab-packed", "varied/trl-best", 1.2),
    ("sftlab / bare loop (varied)", "varied/sftlab", "varied/bare", 0.95),
)


def summarize(records: Sequence[Record], warmup: int, peak: dict) -> dict[str, dict]:
    out = {}
    for rec in records:
        steps = steady(rec.steps, warmup)
        row = {
            "tokens_per_s": median_rate(steps, "tokens"),
            "tokens_per_cpu_s": median_rate(steps, "tokens", "cpu_seconds"),
            "target_tokens_per_s": median_rate(steps, "targets"),
            "padding_efficiency": padding_efficiency(steps),
            "step_s": statistics.median(s.seconds for s in steps),
            "tokens_per_step": statistics.mean(s.tokens for s in steps),
            "peak_memory_mb": rec.extra.get("peak_memory_mb"),
            "measured_steps": len(steps),
            **{k: v for k, v in rec.extra.items() if k not in ("flops", "peak_memory_mb")},
        }
        if rec.extra.get("flops"):
            fm = FlopModel(**rec.extra["flops"])
            row.update(_efficiency(fm, steps, peak))
        out[rec.name] = row
    return out


def _efficiency(fm: FlopModel, steps: Sequence[Step], peak: dict) -> dict:
    """Model GFLOP/s and its share of the matmul peaks, per wall second and per CPU second."""
    out: dict[str, float | None] = {}
    for clock, suffix in (("seconds", ""), ("cpu_seconds", "_per_cpu_s")):
        rates = [
            fm.step_flops(s.tokens - s.repeated, s.targets, s.pairs) / getattr(s, clock)
            for s in steps
            if getattr(s, clock) > 0
        ]
        gflops = statistics.median(rates) / 1e9 if rates else None
        out[f"model_gflops{suffix}"] = gflops
        for dtype in ("bf16", "fp32"):
            pk = peak.get(f"{dtype}_gflops{suffix}")
            out[f"efficiency_{dtype}{suffix}"] = gflops / pk if gflops and pk else None
    return out


def _target(
    what: str, value: float | None, threshold: float, higher: bool = True, cpu_value: float | None = None
) -> dict:
    """`value` (per wall second) decides; `cpu_value` (per CPU second) is shown beside it as a load check."""
    holds = None if value is None else (value >= threshold if higher else value <= threshold)
    return {
        "what": what,
        "value": value,
        "threshold": threshold,
        "higher_is_better": higher,
        "holds": holds,
        "cpu_value": cpu_value,
    }


def targets(result: dict) -> list[dict]:
    runs = result.get("runs", {})

    def tps(name: str, key: str = "tokens_per_s") -> float | None:
        return runs.get(name, {}).get(key)

    out = [
        _target(
            what,
            ratio(tps(a), tps(b)),
            t,
            cpu_value=ratio(tps(a, "tokens_per_cpu_s"), tps(b, "tokens_per_cpu_s")),
        )
        for what, a, b, t in RATIO_TARGETS
        if a in runs and b in runs
    ]
    if "iso/sftlab" in runs:
        r = runs["iso/sftlab"]
        out.append(
            _target(
                "compute efficiency (bf16 peak)",
                r.get("efficiency_bf16"),
                0.50,
                cpu_value=r.get("efficiency_bf16_per_cpu_s"),
            )
        )
    if "varied/sftlab-packed" in runs:
        out.append(
            _target(
                "padding efficiency, packed (varied)",
                runs["varied/sftlab-packed"]["padding_efficiency"],
                0.95,
            )
        )
    prep = result.get("data_prep") or {}
    if prep:
        out.append(_target("data preparation rows/s", prep.get("rows_per_s"), 20_000))
        out.append(_target("cached reload s", prep.get("reload_s"), 1.0, higher=False))
    if result.get("first_step"):
        out.append(_target("first optimizer step s", result["first_step"].get("seconds"), 20.0, higher=False))
    return out


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict) -> str:
    peak = result["peak"]
    rounds = f" x {result['repeat']} rounds" if result.get("repeat", 1) > 1 else ""
    lines = [
        f"sftlab-bench {result['date']} on {result['machine'].get('gpu') or result['machine'].get('cpu')} "
        f"({result['machine']['cpu_threads']} threads), {result['warmup']} warm-up + {result['steps']} "
        f"measured steps{rounds}, medians",
        f"matmul peak ({peak['n']}^3): fp32 {peak['fp32_gflops']:.0f} GFLOP/s, "
        f"bf16 {peak['bf16_gflops']:.0f} GFLOP/s (per CPU second: fp32 "
        f"{peak.get('fp32_gflops_per_cpu_s', 0):.0f}, bf16 {peak.get('bf16_gflops_per_cpu_s', 0):.0f})",
        "",
        f"{'run':24} {'tok/s':>7} {'tok/cpu-s':>9} {'tgt tok/s':>9} {'pad eff':>7} {'step s':>7} "
        f"{'tok/step':>8} {'GFLOP/s':>8} {'%bf16pk':>7} {'peak MB':>8}",
    ]
    for name, r in result.get("runs", {}).items():
        eff = r.get("efficiency_bf16")
        lines.append(
            f"{name:24} {_fmt(r['tokens_per_s']):>7} {_fmt(r.get('tokens_per_cpu_s')):>9} "
            f"{_fmt(r['target_tokens_per_s']):>9} "
            f"{_fmt(r['padding_efficiency'], '.2f'):>7} {_fmt(r['step_s'], '.2f'):>7} "
            f"{_fmt(r['tokens_per_step']):>8} {_fmt(r.get('model_gflops')):>8} "
            f"{_fmt(None if eff is None else 100 * eff, '.0f'):>7} {_fmt(r.get('peak_memory_mb')):>8}"
        )
    prep = result.get("data_prep")
    if prep:
        lines += [
            "",
            f"data preparation: {prep['rows']} alpaca rows in {prep['seconds']:.2f} s = "
            f"{prep['rows_per_s']:.0f} rows/s; cached reload {_fmt(prep.get('reload_s'), '.3f')} s",
        ]
        if prep.get("tokenizer_s"):
            lines.append(
                f"  of which the tokenizer alone: {prep['tokens']} tokens in {prep['tokenizer_s']:.2f} s = "
                f"{prep['tokens'] / prep['tokenizer_s'] / 1e6:.2f} M tokens/s, a ceiling of "
                f"{prep['tokenizer_rows_per_s']:.0f} rows/s"
            )
    if result.get("data_scale"):
        lines += render_table(result["data_scale"])
    audit = result.get("data_audit")
    if audit:
        lines.append(
            f"data audit (sftlab-data audit's analysis): {audit['rows']} alpaca rows in "
            f"{audit['seconds']:.1f} s = {audit['rows_per_s']:.0f} rows/s "
            f"(read {audit['read_s']} s, audit {audit['audit_s']} s)"
        )
    first = result.get("first_step")
    if first:
        lines.append(
            f"python train.py -> first optimizer step: {_fmt(first.get('seconds'), '.1f')} s"
            + (f" ({first['error'][-300:]})" if first.get("error") else "")
        )
    lines += ["", f"targets (ratios from this run; {'per CPU second':>14} beside, as a check against load):"]
    for t in result.get("targets", []):
        mark = {True: "holds", False: "MISSED", None: "n/a"}[t["holds"]]
        op = ">=" if t["higher_is_better"] else "<="
        cpu = "" if t.get("cpu_value") is None else f"  (per CPU s: {t['cpu_value']:.3g})"
        lines.append(f"  {t['what']:40} {_fmt(t['value'], '.3g'):>8} {op} {t['threshold']:<8g} {mark:6}{cpu}")
    return "\n".join(lines)


def figures(result: dict) -> list[tuple[str, str, str]]:
    """Every headline figure of one bench run as (figure, value, how it was measured): the training runs, data
    preparation, data at scale, the data audit, loss memory, the first step and CLI latency, whichever ran."""
    rows: list[tuple[str, str, str]] = []
    runs = result.get("runs", {})
    for name in ("iso/sftlab", "varied/sftlab-packed"):
        r = runs.get(name)
        if r:
            eff = r.get("efficiency_bf16")
            rows.append(
                (f"{name} tok/s", _fmt(r["tokens_per_s"]), f"{_fmt(r.get('tokens_per_cpu_s'))} per CPU s")
            )
            rows.append(
                (f"{name} % of bf16 peak", _fmt(None if eff is None else 100 * eff, ".1f"), "model FLOPs")
            )
    for t in result.get("targets", []):
        if t["what"].startswith("sftlab"):
            rows.append((t["what"], _fmt(t["value"], ".2f"), "tokens/s ratio"))
    prep = result.get("data_prep")
    if prep:
        rows.append(("data prep rows/s", _fmt(prep["rows_per_s"]), f"{prep['rows']} alpaca rows"))
        rows.append(("cached reload s", _fmt(prep.get("reload_s"), ".2f"), f"{prep['rows']} alpaca rows"))
    for r in result.get("data_scale") or []:
        how = f"{r['rows']} rows, fresh process" + (
            " (quick setting)" if result.get("data_scale_quick") else ""
        )
        rows.append((f"data scale {r['rows']} rows/s", _fmt(r["rows_per_s"]), how))
        rows.append((f"data scale {r['rows']} peak MB", _fmt(r["peak_rss_mb"]), how))
    audit = result.get("data_audit")
    if audit:
        rows.append(("data audit rows/s", _fmt(audit["rows_per_s"]), f"{audit['rows']} alpaca rows"))
    for r in result.get("loss_memory") or []:
        chunk = r["chunk_size"] or "none"
        value = r.get("skipped") or f"{r['peak_growth_mib']:.0f}"
        rows.append(
            (f"loss memory MiB, {r['targets']} targets, chunk {chunk}", value, "128k vocab, peak growth")
        )
    first = result.get("first_step")
    if first:
        rows.append(
            ("first optimizer step s", _fmt(first.get("seconds"), ".1f"), "python train.py eval=none")
        )
    for name, seconds in (result.get("cli_latency_s") or {}).items():
        rows.append((f"CLI latency {name} s", _fmt(seconds, ".1f"), "sftlab-train, fresh process"))
    return rows


def render_figures(result: dict) -> str:
    rows = figures(result)
    width = max((len(f) for f, _, _ in rows), default=10)
    lines = ["", "every figure of this run:", f"  {'figure':{width}} {'value':>9}  how"]
    lines += [f"  {f:{width}} {v:>9}  {how}" for f, v, how in rows]
    return "\n".join(lines)


def history_row(result: dict) -> str:
    """One Markdown row for the History table of docs/performance.md: date, machine, commit, command and the
    figures a reader compares across runs."""
    runs = result.get("runs", {})
    iso = runs.get("iso/sftlab", {})
    eff = iso.get("efficiency_bf16")
    ratios = {t["what"]: t["value"] for t in result.get("targets", [])}
    machine = result["machine"].get("gpu") or result["machine"].get("cpu")
    return (
        f"| {result['date']} | {machine}, {result['machine']['cpu_threads']} threads | "
        f"{result.get('commit') or '-'} | `{result.get('command') or 'sftlab-bench'}` | "
        f"{_fmt(iso.get('tokens_per_s'))} | {_fmt(None if eff is None else 100 * eff, '.1f')} | "
        f"{_fmt(ratios.get('sftlab / TRL defaults'), '.2f')} | "
        f"{_fmt(ratios.get('sftlab / bare loop'), '.2f')} |"
    )
