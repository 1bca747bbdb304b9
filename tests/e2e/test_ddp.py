"""DDP on CPU (gloo): 2 processes x micro-batch 2 train the same adapter as 1 process x micro-batch 4.

Both runs see the same global steps (12 examples, 3 steps, shuffled by the same seed) and each step's loss is
normalized by the target tokens of the whole global batch, so the weights agree to float rounding. LoRA
dropout is off: each rank draws its own dropout masks, which no single process can reproduce.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from sftlab.data.sampler import StepPlanSampler
from tests.conftest import ROOT, small_iso_data, tiny_train_command


def _run(run_dir, extra: list[str]) -> None:
    cmd = tiny_train_command(
        run_dir, "adapter.lora_dropout=0.0", "trainer.precision=32", "trainer.max_epochs=1", *extra
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    data = small_iso_data(tmp_path, n_train=12, n_val=4)
    _run(tmp_path / "single", [*data, "data.batch_size=4", "eval=none"])
    ddp_options = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=2"]
    evaluation = ["eval=generate", "eval.generate.max_new_tokens=4"]
    with_test = [*data[:-1], f"data.test_path={tmp_path / 'val.jsonl'}"]  # data[-1]: data.test_path=null
    _run(tmp_path / "ddp", [*with_test, *ddp_options, *evaluation])

    single = torch.load(tmp_path / "single/checkpoints/last.ckpt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp/checkpoints/last.ckpt", weights_only=True)
    # 12 examples in micro-batches of 2 make 3 steps only if 2 ranks shared every step.
    assert single["global_step"] == ddp["global_step"] == 3
    ref = load_file(tmp_path / "single/adapter/adapter_model.safetensors")
    got = load_file(tmp_path / "ddp/adapter/adapter_model.safetensors")
    assert ref.keys() == got.keys()
    lora_b = [name for name in ref if "lora_B" in name]
    assert lora_b and all(ref[name].abs().max() > 0 for name in lora_b)  # B starts at zero: it trained
    for name in ref:
        assert torch.allclose(ref[name], got[name], rtol=1e-5, atol=1e-7), name

    # Lightning started rank 1 by running the same command (its log: train_ddp_process_1.log). It trained,
    # but only rank 0 evaluated, saved and reported.
    logs = ("train.log", "train_ddp_process_1.log")
    rank0, rank1 = ((tmp_path / "ddp" / name).read_text() for name in logs)
    assert "Parameters:" in rank1 and "Evaluating" not in rank1 and "Saved" not in rank1
    assert rank0.count("Evaluating the base model") == rank0.count("Evaluating the tuned model") == 1
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"base", "tuned"}


@pytest.mark.parametrize("n", [1, 5, 12, 13, 17, 31])
@pytest.mark.parametrize(
    ("batch_size", "accumulate", "world_size"), [(2, 1, 2), (2, 2, 2), (3, 2, 4), (1, 4, 3)]
)
@pytest.mark.parametrize("grouped", [False, True])
def test_every_rank_gets_the_same_micro_batches_per_step(n, batch_size, accumulate, world_size, grouped):
    """Unequal micro-batch counts would hang DDP; every example is trained once per epoch (a final step with
    fewer examples than ranks is left out and logged). The same with length-grouped batches."""
    targets = [(i * 7) % 11 + 1 for i in range(n)]
    lengths = [t + (i * 13) % 17 for i, t in enumerate(targets)] if grouped else None
    plans = [
        StepPlanSampler(targets, batch_size, accumulate, world_size, rank, seed=3, lengths=lengths)
        for rank in range(world_size)
    ]
    for p in plans:
        p.set_epoch(1)
    batches = [list(p) for p in plans]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(plans[0])
    seen = [i for b in batches for mb in b for i, _ in mb]
    assert len(seen) == len(set(seen)) and len(seen) >= n - (world_size - 1)
    assert len(seen) == n or n % (batch_size * accumulate * world_size) < world_size
    assert all(len(mb) >= 1 for b in batches for mb in b)
    # The micro-batches of one step (same index range on every rank) carry that step's global target count.
    for k in range(len(batches[0])):
        step = k // accumulate
        lo, hi = step * accumulate, min((step + 1) * accumulate, len(batches[0]))
        members = [i for b in batches for mb in b[lo:hi] for i, _ in mb]
        assert {t for b in batches for i, t in b[k]} == {sum(targets[i] for i in members)}


def test_resume_skips_exactly_the_consumed_micro_batches():
    plan = StepPlanSampler(list(range(1, 21)), batch_size=2, accumulate=2, seed=5)
    plan.set_epoch(1)
    full = list(plan)
    plan.resume_from(epoch=1, consumed=3)
    assert list(plan) == full[3:]
    assert list(plan) == full  # the skip applies once
    plan.resume_from(epoch=0, consumed=3)  # a checkpoint from the end of another epoch: nothing to skip
    assert list(plan) == full
