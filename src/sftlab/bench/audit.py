"""The data audit's speed on a large generated set: the analysis of `sftlab-data audit` on `rows` alpaca
rows (5 % held out as validation, so contamination runs too), timed per phase. Writing the report (a
Markdown file, JSON and a few plots, whatever the size of the data) belongs to the command, not timed here."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sftlab import build
from sftlab.bench import data as gen


def data_audit(spec: dict[str, Any]) -> dict[str, Any]:
    """Seconds to read and audit (tokens, duplicates, contamination, conflicts, flags, diversity)
    `spec["rows"]` generated rows. spec: overrides, workdir, rows."""
    from sftlab.data.audit import AuditSettings, audit_splits, read_splits

    workdir = Path(spec["workdir"])
    cfg = build.compose(spec["overrides"], workdir / "audit")
    p = build.parts(cfg)
    path = gen.write_jsonl(gen.alpaca_rows(spec["rows"]), workdir / "audit-alpaca.jsonl")
    dm = build.datamodule(
        p, setup=False, train_path=str(path), val_path=None, test_path=None, val_fraction=0.05
    )
    timings = {}
    start = time.perf_counter()
    splits = read_splits(dm.sources, "alpaca", {}, val_fraction=dm.val_fraction, seed=dm.seed)
    timings["read_s"] = time.perf_counter() - start
    start = time.perf_counter()
    result = audit_splits(
        splits, p.template, p.tokenizer, AuditSettings(), batch_size=dm.batch_size, **dm.encode_kwargs
    )
    timings["audit_s"] = time.perf_counter() - start
    seconds = sum(timings.values())
    return {
        "rows": spec["rows"],
        "seconds": seconds,
        "rows_per_s": spec["rows"] / seconds,
        **{k: round(v, 2) for k, v in timings.items()},
        "duplicates": {s: r["duplicates"]["exact"]["rows"] for s, r in result.report["splits"].items()},
        "near_duplicates": {s: r["duplicates"]["near"]["rows"] for s, r in result.report["splits"].items()},
    }
