"""The GPU check's CPU dry run: the same code path as `make gpu-check` (the gpu-marked tests through pytest
and JUnit XML, sftlab and the bare loop side by side, the JSON and the table), with tiny shapes."""

from __future__ import annotations

import json

import torch

from sftlab.bench import gpu_check

GPU_TESTS = {
    "test_gpu::test_a_mixed_precision_step_trains_on_the_gpu[bf16-mixed]",
    "test_gpu::test_a_mixed_precision_step_trains_on_the_gpu[16-mixed]",
    "test_gpu::test_qlora_trains_on_bitsandbytes_cuda_kernels",
    "test_gpu::test_evaluation_and_generation_run_on_the_gpu_after_fit",
    "test_gpu::test_packed_rows_give_each_example_its_unpacked_loss_on_the_gpu[sdpa]",
    "test_gpu::test_merging_on_the_gpu_keeps_the_adapted_outputs",
}


def test_dry_run_reports_every_gpu_test_and_both_runners_per_model(tmp_path):
    result = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu-check.json").read_text())
    assert saved == json.loads(json.dumps(result))
    cases = {c["test"]: c for c in saved["tests"]["cases"]}
    assert set(cases) >= GPU_TESTS, saved["tests"].get("output_tail")
    if not torch.cuda.is_available():
        assert {c["outcome"] for c in cases.values()} == {"skipped"}
        assert {c["message"] for c in cases.values()} == {"needs a CUDA device"}

    rows = {r["model"]: r for r in saved["throughput"]}
    assert set(rows) == {"lora", "full"}
    for name, row in rows.items():
        ours, bare = row["sftlab"], row["bare"]
        assert ours["device"] == bare["device"] == "cpu", name
        assert ours["steps"] == bare["steps"] == 1 and ours["tokens_per_s"] > 0 and bare["tokens_per_s"] > 0
        assert row["speed_ratio"] == round(ours["tokens_per_s"] / bare["tokens_per_s"], 3)

    table = (tmp_path / "gpu-check.md").read_text()
    assert "dry run" in table
    assert all(f"| {name} | {rows[name]['sftlab']['tokens_per_s']} |" in table for name in rows)
    assert all(f"| {test} | " in table for test in GPU_TESTS)
