"""What the user sees: the composed config as a tree, and the base-vs-tuned table at the end."""

from __future__ import annotations

import textwrap
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

from sftlab.rundir.redact import redact, secret_values

console = Console()
FIRST = ("model", "template", "data", "adapter", "optimizer", "scheduler", "trainer", "eval")


def print_config(cfg: DictConfig) -> None:
    tree = Tree("config", guide_style="dim")
    keys = [k for k in FIRST if k in cfg] + [k for k in cfg if k not in FIRST]
    secrets = secret_values()
    for key in keys:
        # Unresolved (as composed) and masked: `${oc.env:...}` values are never expanded into the log.
        first, _, rest = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [key]), resolve=False).partition("\n")
        text = redact(textwrap.dedent(rest) if rest.strip() else first.split(":", 1)[1].strip(), secrets)
        tree.add(f"[bold]{key}[/bold]").add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    console.print(tree)


def print_comparison(evals: dict[str, dict[str, Any]]) -> None:
    """Side-by-side metrics of the base and the tuned model, with the change."""
    base, tuned = evals.get("base", {}), evals.get("tuned", {})
    table = Table(title="Held-out evaluation: base vs tuned")
    for col in ("metric", "base", "tuned", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for metric in sorted(set(base) | set(tuned)):
        b, t = base.get(metric), tuned.get(metric)
        delta = f"{t - b:+.3f}" if isinstance(b, float) and isinstance(t, float) else ""
        table.add_row(metric, _fmt(b), _fmt(t), delta)
    console.print(table)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("-" if value is None else str(value))
