"""The data-scale bench: its figures are consistent with what it prepared, and the table prints them. Each
step runs in this process here (the bench runs them in fresh ones); no timing is asserted."""

from __future__ import annotations

import pytest

from sftlab.bench import scale
from sftlab.bench.report import render


def in_process(target: str, spec: dict) -> dict:
    return getattr(scale, target.split(":")[1])(spec)


@pytest.mark.slow  # two rounds and a reload, each building the tokenizer: about 10 s
def test_data_scale_prepares_reloads_and_measures_the_ceiling_on_the_same_rows(tmp_path, tiny_model_dir):
    spec = {"overrides": ["model=tiny_random"], "workdir": str(tmp_path), "sizes": [300], "num_proc": 1}
    (row,) = scale.data_scale({**spec, "repeat": 2}, in_process)
    assert row["rows"] == row["kept"] == 300  # generated alpaca rows all fit the default max_length
    assert row["tokens"] > 300 * 20 and row["num_proc"] == 1
    assert row["tokens_per_s"] == row["tokens"] / row["seconds"]
    first, second = row["rounds"]  # each round's ratio is its own preparation against its own ceiling
    assert row["seconds"] == (first["seconds"] + second["seconds"]) / 2
    assert (
        row["of_ceiling"]
        == (first["tokenizer_s"] / first["seconds"] + second["tokenizer_s"] / second["seconds"]) / 2
    )
    assert row["reload_s"] > 0 and row["peak_rss_mb"] >= row["rss_before_mb"] > 0
    assert [p.name for p in tmp_path.glob("scale-cache-300/*")] != []  # the entry the reload read
    assert not (tmp_path / "scale-cache-300-1").exists()  # the second round's, removed
    assert not (tmp_path / "scale-300.jsonl").exists()  # the generated file is removed
    peak = {"n": 8, "fp32_gflops": 1.0, "bf16_gflops": 1.0}
    machine = {"cpu": "cpu", "cpu_threads": 2}
    text = render(
        {"date": "d", "machine": machine, "warmup": 1, "steps": 1, "peak": peak, "data_scale": [row]}
    )
    assert "medians of 2 round(s)" in text and f"{row['rows']:>9} " in text
