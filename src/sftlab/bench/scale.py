"""Data preparation at scale (`sftlab-bench --only data-scale`): generated alpaca rows (10k, 100k, 1M, ...)
through the whole pipeline into the Arrow cache, each size in fresh processes so peak RSS is that size's own.

Per size: processing seconds, rows/s and tokens/s, peak RSS of the process that prepares the data and of its
largest tokenizing worker, the seconds and RSS of a cached reload in a new process, and the tokenizer-only
ceiling on the same rows (every distinct segment text through the batched tokenizer call with its own
threads, in chunks as data preparation makes it), with the ratio of the two. With `repeat` > 1 both run that
many times in turn, each preparation into a fresh cache: this machine's speed moves by a third within
minutes, so the ratio is the median of each round's own (a preparation and the ceiling right after it).
"""

from __future__ import annotations

import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from sftlab import build
from sftlab.bench import data as gen


def _rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def _datamodule(spec: dict[str, Any]) -> tuple[Any, Any]:
    workdir = Path(spec["workdir"])
    p = build.parts(build.compose(spec["overrides"], workdir / "scale"))
    settings = {
        "train_path": spec["path"],
        "val_path": None,
        "test_path": None,
        "format": "alpaca",
        "cache_dir": str(_cache_dir(spec)),
        "max_drop_ratio": 1.0,
    }
    if spec.get("num_proc"):
        settings["num_proc"] = spec["num_proc"]
    return p, build.datamodule(p, setup=False, **settings)


def _cache_dir(spec: dict[str, Any]) -> Path:
    """Each round's own cache; round 0's is the one the reload reads."""
    suffix = f"-{spec['round']}" if spec.get("round") else ""
    return Path(spec["workdir"]) / f"scale-cache-{spec['rows']}{suffix}"


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """One process: prepare (or, on a cache hit, reload) the rows; seconds and peak RSS."""
    _, dm = _datamodule(spec)
    before = _rss_mb()
    start = time.perf_counter()
    dm.setup("fit")
    seconds = time.perf_counter() - start
    train = dm.splits["train"]
    return {
        "seconds": seconds,
        "kept": len(train.examples),
        "tokens": sum(train.lengths),
        "rss_before_mb": before,
        "peak_rss_mb": _rss_mb(),
        "worker_peak_rss_mb": _rss_mb(resource.RUSAGE_CHILDREN) or None,
        "num_proc": dm.num_proc,
    }


def tokenizer_ceiling(spec: dict[str, Any], chunk: int = 10_000) -> dict[str, Any]:
    """Seconds of the batched tokenizer call alone on the kept rows' distinct segment texts (rendering and
    reading not timed), chunk by chunk from the cached rows."""
    from sftlab.data.tokenize import encode_batch, render

    p, dm = _datamodule(spec)
    dm.setup("fit")
    rows = dm.splits["train"].rows
    seconds, tokens = 0.0, 0
    for start in range(0, len(rows), chunk):
        segments = [render(c, p.template, p.tokenizer, "all_assistant") for c in rows[start : start + chunk]]
        texts = list(dict.fromkeys(seg.text for segs in segments for seg in segs))
        t0 = time.perf_counter()
        ids = encode_batch(texts, p.tokenizer)
        seconds += time.perf_counter() - t0
        tokens += sum(map(len, ids))
    return {"tokenizer_s": seconds, "tokenizer_tokens": tokens}


def data_scale(spec: dict[str, Any], call: Any) -> list[dict[str, Any]]:
    """The table: for each of spec["sizes"], write the rows, then `repeat` rounds of preparation and the
    ceiling, then a reload of the first round's cache, each in a fresh process through `call` (run.call).
    Seconds are medians over the rounds, peak RSS the largest."""
    workdir = Path(spec["workdir"])
    table = []
    for rows in spec["sizes"]:
        path = gen.write_jsonl(gen.iter_alpaca_rows(rows), workdir / f"scale-{rows}.jsonl")
        one = {**spec, "rows": rows, "path": str(path)}
        rounds = []
        for k in range(spec.get("repeat", 1)):
            prepared = call("scale:prepare", {**one, "round": k})
            rounds.append({**prepared, **call("scale:tokenizer_ceiling", {**one, "round": k})})
            if k:
                shutil.rmtree(_cache_dir({**one, "round": k}))
        reload = call("scale:prepare", one)
        first = rounds[0]
        seconds = statistics.median(r["seconds"] for r in rounds)
        ceiling_s = statistics.median(r["tokenizer_s"] for r in rounds)
        table.append(
            {
                "rows": rows,
                "file_mb": path.stat().st_size / 2**20,
                "kept": first["kept"],
                "tokens": first["tokens"],
                "seconds": seconds,
                "rows_per_s": rows / seconds,
                "tokens_per_s": first["tokens"] / seconds,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
                "rss_before_mb": first["rss_before_mb"],
                "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] or 0 for r in rounds) or None,
                "num_proc": first["num_proc"],
                "reload_s": reload["seconds"],
                "reload_peak_rss_mb": reload["peak_rss_mb"],
                "tokenizer_rows_per_s": first["kept"] / ceiling_s,
                "of_ceiling": statistics.median(r["tokenizer_s"] / r["seconds"] for r in rounds),
                "rounds": [{"seconds": r["seconds"], "tokenizer_s": r["tokenizer_s"]} for r in rounds],
            }
        )
        path.unlink()
    return table


def render_table(table: list[dict[str, Any]]) -> list[str]:
    rounds = len(table[0].get("rounds", [None])) if table else 1  # a table stored before rounds: one
    lines = [
        "",
        f"data at scale (generated alpaca rows; fresh processes per size; medians of {rounds} round(s)):",
        f"{'rows':>9} {'file MB':>8} {'prep s':>7} {'rows/s':>7} {'tok/s':>8} {'peak MB':>8} {'(start)':>8} "
        f"{'worker':>7} {'reload s':>8} {'tok-only rows/s':>15} {'of ceil':>7}",
    ]
    for r in table:
        lines.append(
            f"{r['rows']:>9} {r['file_mb']:>8.0f} {r['seconds']:>7.1f} {r['rows_per_s']:>7.0f} "
            f"{r['tokens_per_s']:>8.0f} {r['peak_rss_mb']:>8.0f} {r['rss_before_mb']:>8.0f} "
            f"{r['worker_peak_rss_mb'] or 0:>7.0f} {r['reload_s']:>8.2f} {r['tokenizer_rows_per_s']:>15.0f} "
            f"{r['of_ceiling']:>7.2f}"
        )
    return lines
