"""`sftlab-report <sweep or run dir>`: a table and plots of a sweep (or one run) from its job directories.

Reads only what train.py writes into each job directory (`.hydra/overrides.yaml`, `metrics.json`,
`csv/metrics.csv`, `error.txt` for a failed sweep job), so it works offline, without W&B, while a sweep is
still running (unfinished jobs show as `running?`) and on a copy of the directory made on another machine.

For a sweep it prints one row per job: the overrides that differ between jobs (the swept hyperparameters),
best validation loss, final train loss, the tuned model's evaluation metrics, steps, runtime; the best job by
`--metric` is starred. It writes `report.md` and PNG plots beside the jobs (or into `--out`):
`val_loss.png` (validation-loss curve per job) and `<metric>_vs_<hyperparameter>.png` for each swept key.
For one run (a directory with `config.yaml`) it plots `curves.png`: train and validation loss, learning rate,
and adds the human review's summary when `sftlab-review run=... summary` wrote one.

A positional path rather than the `key=value` style of the other small CLIs, because the path is the one
thing always given (`sftlab-report multirun/2026-11-24/10-00-00`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from sftlab.errors import SFTLabError
from sftlab.review.summary import headline

LOWER_IS_BETTER = ("loss", "perplexity", "no_stop", "runtime")


@dataclass
class Job:
    """One run directory as the report sees it."""

    name: str
    path: Path
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    status: str = "ok"  # ok | failed | running?
    error: str = ""


# ---- reading ------------------------------------------------------------------------------------------
def parse_overrides(lines: list[str]) -> dict[str, str]:
    """`["optimizer.lr=1e-4", "+x=1"]` -> `{"optimizer.lr": "1e-4", "x": "1"}` (Hydra's prefixes dropped)."""
    out = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        out[key.lstrip("+~")] = value
    return out


def read_curves(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric of Lightning's CSVLogger file as (step, value) pairs, in logged order."""
    curves: dict[str, list[tuple[int, float]]] = {}
    if not csv_path.is_file():
        return curves
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    curves.setdefault(key, []).append((step, float(value)))
    return curves


def load_job(path: Path, name: str | None = None) -> Job:
    job = Job(name or path.name, path)
    overrides_file = path / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        job.overrides = parse_overrides(list(OmegaConf.load(overrides_file)))
    if (path / "metrics.json").is_file():
        job.metrics = json.loads((path / "metrics.json").read_text())
    elif (path / "error.txt").is_file():
        lines = (path / "error.txt").read_text().strip().splitlines()
        job.status, job.error = "failed", lines[-1] if lines else "failed"
    else:
        job.status = "running?"
    job.curves = read_curves(path / "csv" / "metrics.csv")
    return job


def find_jobs(root: Path) -> list[Job]:
    """The job directories under a sweep directory (any depth: custom `hydra.sweep.subdir` included)."""
    dirs = sorted({p.parent.parent for p in root.rglob(".hydra/overrides.yaml")} - {root}, key=_natural)
    return [load_job(d, str(d.relative_to(root))) for d in dirs]


def _natural(path: Path) -> list:
    """0, 1, 2, ..., 10 rather than 0, 1, 10, 2."""
    return [int(p) if p.isdigit() else p for p in path.parts]


# ---- analysis -----------------------------------------------------------------------------------------
def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (or is missing from some): the swept hyperparameters."""
    keys = sorted({k for j in jobs for k in j.overrides})
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def metric_value(job: Job, key: str) -> float | None:
    """A dotted key into metrics.json (`val.best_loss`, `eval.tuned.exact_match`); None when absent or NaN."""
    node: Any = job.metrics
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float) or math.isnan(node):
        return None
    return float(node)


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def best_job(jobs: list[Job], metric: str, minimize: bool) -> Job | None:
    scored = [(v, j) for j in jobs if (v := metric_value(j, metric)) is not None]
    if not scored:
        return None
    return (min if minimize else max)(scored, key=lambda vj: vj[0])[1]


def eval_keys(jobs: list[Job]) -> list[str]:
    """Numeric metrics of the tuned model's evaluation (metrics.json `eval.tuned`), sample counts left out."""
    keys = {
        f"eval.tuned.{k}"
        for j in jobs
        for k, v in (j.metrics.get("eval", {}).get("tuned") or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "n"
    }
    return sorted(keys)


def table_rows(
    jobs: list[Job], swept: list[str], metric: str, best: Job | None
) -> tuple[list[str], list[list]]:
    """Columns: job, the swept values, status, then metrics (header, dotted metrics.json key)."""
    shown = [("best val loss", "val.best_loss"), ("train loss", "train.loss")]
    shown += [(k.removeprefix("eval.tuned."), k) for k in eval_keys(jobs)]
    if metric not in {k for _, k in shown}:
        shown.append((metric, metric))
    shown += [("steps", "steps"), ("runtime s", "runtime_s")]
    columns = ["job", *swept, "status", *(h for h, _ in shown)]
    rows = []
    for j in jobs:
        status = f"failed: {j.error[:60]}" if j.status == "failed" else j.status
        rows.append(
            [
                ("★ " if j is best else "") + j.name,
                *(_short(j.overrides.get(k, "")) for k in swept),
                status,
                *(_fmt(metric_value(j, k), 1 if k == "runtime_s" else 4) for _, k in shown),
            ]
        )
    return columns, rows


def _fmt(value: float | None, decimals: int = 4) -> str:
    if value is None:
        return "-"
    if float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    return (
        f"{value:.{decimals}f}" if abs(value) >= 1e-3 else f"{value:.3g}"
    )  # losses differ in the 3rd decimal


def _short(override: str) -> str:
    """An override value for the table: Optuna's 0.000776735381623706 as 0.000777."""
    number = _number(override)
    return override if number is None or number.is_integer() else f"{number:.3g}"


# ---- plots --------------------------------------------------------------------------------------------
def plot_val_curves(jobs: list[Job], swept: list[str], out: Path) -> Path | None:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for j in jobs:
        points = j.curves.get("val/loss")
        if points:
            label = ", ".join(f"{k}={j.overrides.get(k, '')}" for k in swept) or j.name
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=f"{j.name}: {label}")
    if not ax.lines:
        return None
    ax.set(xlabel="step", ylabel="validation loss", title="Validation loss per job")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(out, dpi=110)
    return out


def plot_metric_vs(jobs: list[Job], key: str, metric: str, out: Path) -> Path | None:
    """The metric of each finished job against one swept hyperparameter (numeric axis when it can be)."""
    points = [(j.overrides.get(key, ""), v) for j in jobs if (v := metric_value(j, metric)) is not None]
    if not points:
        return None
    fig = Figure(figsize=(5, 3.8), layout="constrained")
    ax = fig.subplots()
    numbers = [_number(x) for x, _ in points]
    if all(n is not None for n in numbers):
        ax.scatter(numbers, [v for _, v in points])
        if min(numbers) > 0 and max(numbers) / min(numbers) >= 10:
            ax.set_xscale("log")  # learning rates and the like span decades
    else:
        labels = sorted({x for x, _ in points})
        ax.scatter([labels.index(x) for x, _ in points], [v for _, v in points])
        ax.set_xticks(range(len(labels)), labels)
    ax.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key}")
    ax.grid(alpha=0.3)
    fig.savefig(out, dpi=110)
    return out


def plot_run_curves(job: Job, out: Path) -> Path | None:
    keys = [k for k in ("train/loss", "val/loss", "lr-AdamW") if job.curves.get(k)]
    keys += [k for k in job.curves if k.startswith("lr-") and k not in keys]
    if not keys:
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    loss_ax = fig.subplots()
    for key in (k for k in keys if not k.startswith("lr-")):
        loss_ax.plot(
            *zip(*job.curves[key], strict=True),
            marker="o" if key == "val/loss" else None,
            markersize=3,
            label=key,
        )
    loss_ax.set(xlabel="step", ylabel="loss", title=f"Run {job.path.name}")
    lr_keys = [k for k in keys if k.startswith("lr-")]
    if lr_keys:
        lr_ax = loss_ax.twinx()
        for key in lr_keys:
            lr_ax.plot(*zip(*job.curves[key], strict=True), linestyle="--", color="gray", label=key)
        lr_ax.set_ylabel("learning rate")
    loss_ax.grid(alpha=0.3)
    fig.legend(loc="outside upper center", ncols=3, fontsize=8)
    fig.savefig(out, dpi=110)
    return out


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# ---- output -------------------------------------------------------------------------------------------
def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def optuna_results(root: Path) -> dict[str, Any] | None:
    """What the Optuna sweeper wrote at the end of a search (best params and value), if it did."""
    path = root / "optimization_results.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None


def report_sweep(root: Path, out: Path, metric: str, minimize: bool, console: Console) -> Path:
    jobs = find_jobs(root)
    if not jobs:
        raise SFTLabError(
            f"{root}: no job directories (with .hydra/overrides.yaml) found. Pass a sweep "
            "directory such as multirun/<date>/<time>, or a run directory."
        )
    swept = swept_keys(jobs)
    best = best_job(jobs, metric, minimize)
    columns, rows = table_rows(jobs, swept, metric, best)
    plots = [plot_val_curves(jobs, swept, out / "val_loss.png")]
    plots += [plot_metric_vs(jobs, k, metric, out / f"{_slug(metric)}_vs_{_slug(k)}.png") for k in swept]
    plots = [p for p in plots if p is not None]

    table = Table(title=f"Sweep {root}: {len(jobs)} jobs, best by {metric} ({'min' if minimize else 'max'})")
    for c in columns:
        table.add_column(c, overflow="fold")
    for row in rows:
        table.add_row(*map(str, row))
    console.print(table)
    summary = _best_line(best, swept, metric)
    optuna = optuna_results(root)
    if optuna and "best_params" in optuna:
        summary += f"\n\nOptuna best trial: {optuna['best_params']} -> {_fmt(optuna['best_value'])}"
    failed = [j.name for j in jobs if j.status == "failed"]
    if failed:
        summary += f"\n\nFailed jobs (see their error.txt): {', '.join(failed)}"
    console.print(summary, markup=False)
    md = [
        f"# Sweep report: `{root}`",
        "",
        f"{len(jobs)} jobs; swept: {', '.join(swept) or 'nothing'}.",
        "",
        markdown_table(columns, rows),
        "",
        summary,
        "",
    ]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return out / "report.md"


def _best_line(best: Job | None, swept: list[str], metric: str) -> str:
    if best is None:
        return f"No finished job has {metric}."
    setting = ", ".join(f"{k}={best.overrides.get(k, '')}" for k in swept)
    value = metric_value(best, metric)
    return f"Best job: {best.name} ({setting}) with {metric} = {_fmt(value)}; in {best.path}"


def report_run(path: Path, out: Path, console: Console) -> Path:
    job = load_job(path)
    plot = plot_run_curves(job, out / "curves.png")
    lines = [f"# Run report: `{path}`", "", f"status: {job.status}"]
    for key in ("val.best_loss", "val.loss", "train.loss", "steps", "runtime_s", *eval_keys([job])):
        lines.append(f"- {key}: {_fmt(metric_value(job, key))}")
    lines += human_review_lines(path)
    if plot:
        lines += ["", f"![curves]({plot.name})"]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.print("\n".join(lines[2:]), markup=False)
    return out / "report.md"


def human_review_lines(path: Path) -> list[str]:
    """The human review's headline (`sftlab-review run=... summary`), when the run has one."""
    summary = path / "review" / "summary.json"
    if not summary.is_file():
        return []
    return ["", "```text", *headline(json.loads(summary.read_text())), "```"]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sftlab-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a sweep (multirun/<date>/<time>) or run directory")
    parser.add_argument(
        "--metric",
        default="val.best_loss",
        help="dotted key of metrics.json that picks the best job (default: val.best_loss)",
    )
    parser.add_argument(
        "--maximize",
        action="store_true",
        help="higher is better (default: lower for losses, higher for other metrics)",
    )
    parser.add_argument("--out", type=Path, help="where report.md and the plots go (default: path)")
    args = parser.parse_args(argv)
    # Piped or redirected output keeps whole rows (rich would wrap at 80 columns).
    console = Console(width=None if sys.stdout.isatty() else 200)
    if not args.path.is_dir():
        raise SystemExit(f"sftlab-report: {args.path} is not a directory.")
    out = args.out or args.path
    out.mkdir(parents=True, exist_ok=True)
    try:
        if (args.path / "config.yaml").is_file():
            written = report_run(args.path, out, console)
        else:
            minimize = not args.maximize and lower_is_better(args.metric)
            written = report_sweep(args.path, out, args.metric, minimize, console)
    except SFTLabError as err:
        raise SystemExit(f"sftlab-report: {err}") from None
    console.print(f"Wrote {written} and its plots.")


if __name__ == "__main__":
    main()
