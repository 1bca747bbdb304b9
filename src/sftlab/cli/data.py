"""`sftlab-data audit [group=option ...] [key=value ...]`: audit a dataset before training on it.

A Hydra app on conf/data_audit.yaml, which composes the training config, so `data=... template=...
model=...` and every `data.*` override mean what they mean to `sftlab-train`; only the tokenizer loads.
Writes `audit.json`, `audit.md` and PNG plots to `out_dir` (default: Hydra's run dir,
outputs/audit/<date>/<time>) and prints a table of the checks. Exit status: 0 when no `audit.fail_on` check
holds, 1 when one does (each is named), 2 for a configuration or data error. The definitions of every count
are in `sftlab.data.audit` and docs/data-audit.md.

`sftlab-train data.audit=true` (or `data.audit=[checks]`) runs the same audit into `<run>/audit/` first and
refuses to train when a check holds.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from sftlab import paths
from sftlab.errors import DataError, SFTLabError

log = logging.getLogger("sftlab.data")
COMMANDS = ("audit",)
# What `data.audit=true` refuses to train on: evaluation figures that would lie.
TRAIN_GATE = ("contamination>0",)
CHECK_LABELS = {
    "rows": "rows",
    "bad_rows": "bad rows",
    "duplicates": "exact duplicates",
    "near_duplicates": "near duplicates",
    "contamination": "contamination (seen in train)",
    "conflicts": "conflicts (same prompt, other response)",
    "short": "short responses",
    "refusals": "refusals",
    "repetitive": "repetitive responses",
    "control_chars": "invisible / control characters",
    "echoes": "responses echoing the prompt",
    "chat_markers": "chat markers in content",
    "truncated": "truncated at max_length",
    "dropped": "dropped at max_length",
    "top_kind_share": "share of the top instruction kind",
    "kind_entropy": "instruction-kind entropy (0..1)",
}


# ---- running the audit -----------------------------------------------------------------------------------
def run_audit(cfg: DictConfig, parts: Any, settings: Any, out_dir: Path) -> Any:
    """Read the configured splits, audit them with the run's tokenizer and template, write the report."""
    from sftlab import build
    from sftlab.data.audit import audit_splits, read_splits

    dm = build.datamodule(parts, setup=False)  # the data settings, checked as training checks them
    splits = read_splits(dm.sources, dm.format, dm.fields, val_fraction=dm.val_fraction, seed=dm.seed)
    result = audit_splits(
        splits,
        parts.template,
        parts.tokenizer,
        settings,
        batch_size=dm.batch_size,
        **dm.encode_kwargs,
    )
    data = OmegaConf.to_container(cfg.data, resolve=True)
    result.report["config"] = {
        "data": {s: data[f"{s}_path"] for s in dm.sources},
        "template": cfg.template.get("name"),
        "tokenizer": cfg.model.get("tokenizer_name_or_path") or cfg.model.get("name_or_path"),
    }
    write_report(result, out_dir)
    print_summary(result)
    log.info("Audit report: %s", out_dir / "audit.md")
    return result


def audit_before_training(cfg: DictConfig, parts: Any, out_dir: Path) -> None:
    """`data.audit=true|[checks]` in sftlab-train: audit first; a check that holds stops the run."""
    from sftlab.data.audit import AuditSettings

    value = cfg.data.audit
    checks = list(TRAIN_GATE) if value is True else list(OmegaConf.to_container(value, resolve=True))
    result = run_audit(cfg, parts, AuditSettings(fail_on=checks), out_dir)
    if result.failures:
        raise DataError(
            f"data.audit: the data fails {'; '.join(result.failures)} (report: {out_dir / 'audit.md'}). "
            "Fix the data, or change data.audit (a list of checks) or set it to false."
        )


# ---- the report ------------------------------------------------------------------------------------------
def _fmt(value: float, name: str) -> str:
    if name == "rows":
        return str(int(value))
    return f"{value:.4f}".rstrip("0").rstrip(".") if value else "0"


def plot(result: Any, out_dir: Path) -> dict[str, dict[str, str]]:
    """Per split: a histogram of tokens per example against max_length and a bar chart of instruction
    kinds; returns {split: {"lengths": file, "kinds": file}}."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    files: dict[str, dict[str, str]] = {}
    for split, r in result.report["splits"].items():
        files[split] = {}
        tok = r["tokens"]
        fig = Figure(figsize=(7, 3.5))
        ax = fig.subplots()
        ax.hist(result.lengths[split], bins=tok["histogram"]["edges"], color="#4c72b0")
        if tok["max_length"]:
            ax.axvline(
                tok["max_length"], color="#c44e52", linestyle="--", label=f"max_length {tok['max_length']}"
            )
            ax.legend()
        ax.set(title=f"{split}: tokens per example", xlabel="tokens", ylabel="examples")
        fig.tight_layout()
        fig.savefig(out_dir / f"lengths_{split}.png", dpi=100)
        files[split]["lengths"] = f"lengths_{split}.png"
        top = r["diversity"]["top"]
        if top:
            fig = Figure(figsize=(7, 0.3 * len(top) + 1.2))
            ax = fig.subplots()
            ax.barh([t["kind"] for t in reversed(top)], [t["rows"] for t in reversed(top)], color="#55a868")
            ax.set(title=f"{split}: instruction kinds (leading word)", xlabel="rows")
            fig.tight_layout()
            fig.savefig(out_dir / f"kinds_{split}.png", dpi=100)
            files[split]["kinds"] = f"kinds_{split}.png"
    return files


def write_report(result: Any, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    result.report["plots"] = plot(result, out_dir)
    (out_dir / "audit.json").write_text(json.dumps(result.report, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "audit.md").write_text(markdown(result.report), encoding="utf-8")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(esc(v) for v in row) + " |" for row in rows),
    ]


def _listing(finding: dict, render) -> list[str]:
    lines = [f"- {render(x)}" for x in finding["listed"]]
    if finding["not_listed"]:
        lines.append(f"- … and {finding['not_listed']} more (audit.max_listed)")
    return lines


def markdown(report: dict) -> str:
    splits, checks = report["splits"], report["checks"]
    failed = report["fail_on"]["failed"]
    out = ["# Data audit", ""]
    cfg = report.get("config", {})
    if cfg:
        out += [f"- data: `{json.dumps(cfg['data'])}`", f"- template: `{cfg['template']}`"]
        out += [f"- tokenizer: `{cfg['tokenizer']}`", ""]
    if report["fail_on"]["checks"]:
        verdict = "**FAILED**: " + "; ".join(f"`{f}`" for f in failed) if failed else "**passed**"
        out += [f"fail_on `{report['fail_on']['checks']}`: {verdict}", ""]
    names = list(splits)
    rows = [
        [CHECK_LABELS[c], *(_fmt(checks[c][s], c) if s in checks[c] else "-" for s in names)] for c in checks
    ]
    out += ["## Checks", "", "Fractions of each split's rows (the numbers `fail_on` tests).", ""]
    out += [*_table(["check", *names], rows), ""]
    for split, r in splits.items():
        out += _split_markdown(split, r, report["plots"].get(split, {}))
    return "\n".join(out) + "\n"


def _split_markdown(split: str, r: dict, plots: dict[str, str]) -> list[str]:
    tok, shape = r["tokens"], r["shape"]
    out = [f"## {split}", "", "### Size and shape", ""]
    bad = r["bad_rows"]
    out.append(f"{r['rows']} rows; {bad['rows']} unusable rows {bad['reasons'] or ''}".rstrip())
    out += _listing(bad, lambda x: f"`{x['row']}`: {x['reason']}")
    stat_cols = ["n", "min", "mean", "p50", "p90", "p99", "max", "total"]
    stat_rows = [
        [name, *(stats.get(c, "-") for c in stat_cols)]
        for name, stats in (
            ("messages per row", shape["messages"]),
            ("assistant turns per row", shape["assistant_turns"]),
            ("prompt tokens (untrained)", tok["prompt"]),
            ("response tokens (trained)", tok["response"]),
            ("tokens per example", tok["example"]),
        )
    ]
    out += ["", *_table(["", *stat_cols], stat_rows), "", f"Messages by role: {shape['roles']}", ""]
    if "lengths" in plots:
        out += [f"![tokens per example, {split}]({plots['lengths']})", ""]
    fc, epoch = tok["forecast"], tok["epoch"]
    out += [
        f"At max_length={tok['max_length']} (truncation={tok['truncation']}): {tok['over_max_length']} "
        f"examples are longer; {fc['kept']} kept whole, {fc['truncated']} truncated, dropped "
        f"{fc['dropped'] or 'none'}.",
        "",
        f"One epoch: {epoch['examples']} examples, {epoch['tokens']} tokens, "
        f"{epoch['target_tokens']} trained tokens, {epoch['batches']} batches.",
        "",
        "### Duplicates",
        "",
    ]
    exact, near = r["duplicates"]["exact"], r["duplicates"]["near"]
    out.append(f"Exact: {exact['rows']} duplicate rows in {exact['groups']} groups.")
    out += _listing(exact, lambda g: ", ".join(f"`{w}`" for w in g))
    out.append(f"\nNear (Jaccard >= threshold): {near['rows']} rows, {near['pairs']} pairs.")
    out += _listing(near, lambda p: f"`{p['row']}` ~ `{p['earlier']}` ({p['similarity']})")
    if "contamination" in r:
        c = r["contamination"]
        out += [
            "",
            "### Contamination",
            "",
            f"{c['rows']} rows seen in train ({c['same_prompt']} with the same prompt).",
        ]
        out += _listing(c, lambda p: f"`{p['row']}` ~ train `{p['train']}` ({p['match']})")
    conf = r["conflicts"]
    out += [
        "",
        "### Conflicts",
        "",
        f"{conf['prompts']} prompts with different responses ({conf['rows']} rows).",
    ]
    out += _listing(
        conf,
        lambda g: (
            f"{g['prompt']!r}: " + "; ".join(f"`{x['row']}` → {x['response']!r}" for x in g["responses"])
        ),
    )
    out += ["", "### Quality flags", ""]
    for name, f in r["flags"].items():
        out.append(f"**{CHECK_LABELS[name]}**: {f['rows']} rows")
        out += _listing(f, lambda x: f"`{x['row']}`: {x['detail']}")
        out.append("")
    d = r["diversity"]
    out += [
        "### Diversity",
        "",
        f"{d['kinds']} instruction kinds; the top one covers {d['top_share']:.1%}, the top ten "
        f"{d['top10_share']:.1%}; normalized entropy {d['entropy']}.",
        "",
    ]
    if "kinds" in plots:
        out += [f"![instruction kinds, {split}]({plots['kinds']})", ""]
    return out


def print_summary(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    checks, splits = result.report["checks"], list(result.report["splits"])
    table = Table(title="Data audit")
    table.add_column("check")
    for s in splits:
        table.add_column(s, justify="right")
    for c, values in checks.items():
        table.add_row(CHECK_LABELS[c], *(_fmt(values[s], c) if s in values else "-" for s in splits))
    console = Console(stderr=True)
    console.print(table)
    for failure in result.failures:
        console.print(f"[bold red]failed[/]: {failure}")


# ---- the command -----------------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path=str(paths.config_dir()), config_name="data_audit")
def audit_app(cfg: DictConfig) -> None:
    from hydra.utils import instantiate

    from sftlab import build
    from sftlab.config import validate
    from sftlab.data.audit import parse_checks

    try:
        validate(cfg)  # with the running app's config sources: data_audit.yaml and its defaults
        parse_checks(cfg.audit.fail_on, "audit.fail_on")  # instantiate would wrap the error in its own
        settings = instantiate(cfg.audit)
        result = run_audit(cfg, build.parts(cfg), settings, Path(cfg.out_dir))
    except SFTLabError as err:
        log.error("%s", err)
        sys.exit(2)
    if result.failures:
        log.error("audit failed: %s", "; ".join(result.failures))
        sys.exit(1)


def quote_checks(arg: str) -> str:
    """`fail_on=[contamination>0,duplicates>0.05]` -> `audit.fail_on=["contamination>0","duplicates>0.05"]`:
    Hydra's override grammar reads `>` only inside quotes, and checks are easier typed bare."""
    key, sep, value = arg.partition("=")
    if not sep or key not in ("fail_on", "audit.fail_on", "+audit.fail_on"):
        return arg
    body = value.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    checks = [c.strip().strip("'\"") for c in body.split(",") if c.strip()]
    return "audit.fail_on=[" + ",".join(json.dumps(c) for c in checks) + "]"


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] not in COMMANDS:
        print(f"usage: sftlab-data {{{','.join(COMMANDS)}}} [group=option ...] [key=value ...]\n\n{__doc__}")
        sys.exit(0 if args and args[0] in ("-h", "--help") else 2)
    # Hydra parses what follows the subcommand.
    sys.argv = [f"{sys.argv[0]} {args[0]}", *(quote_checks(a) for a in args[1:])]
    audit_app()


if __name__ == "__main__":
    main()
