"""DDP on CPU (gloo): 2 processes x micro-batch 2 train the same adapter as 1 process x micro-batch 4.

Both runs see the same global steps (12 examples, 3 steps, shuffled by the same seed) and each step's loss is
normalized by the target tokens of the whole global batch, so the weights agree to float rounding. LoRA
dropout is off: each rank draws its own dropout masks, which no single process can reproduce.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sftlab.data.sampler import StepPlanSampler
from tests.conftest import ROOT
from tests.unit.test_resume import DATA


def _run(run_dir, train, val, extra: list[str]) -> None:
    cmd = [
        sys.executable,
        "train.py",
        "model=tiny_random",
        "logger=csv",
        "eval=none",
        "data.test_path=null",
        f"data.train_path={train}",
        f"data.val_path={val}",
        "adapter.lora_dropout=0.0",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "trainer.max_epochs=1",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    for split, n in (("train", 12), ("val", 4)):
        lines = (DATA / f"{split}.jsonl").read_text().splitlines()[:n]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    _run(tmp_path / "single", train, val, ["data.batch_size=4"])
    _run(
        tmp_path / "ddp",
        train,
        val,
        ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=2"],
    )

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


@pytest.mark.parametrize("n", [1, 5, 12, 13, 17, 31])
@pytest.mark.parametrize(
    ("batch_size", "accumulate", "world_size"), [(2, 1, 2), (2, 2, 2), (3, 2, 4), (1, 4, 3)]
)
def test_every_rank_gets_the_same_micro_batches_per_step(n, batch_size, accumulate, world_size):
    """Unequal micro-batch counts would hang DDP; every example is trained once per epoch (a final step with
    fewer examples than ranks is left out and logged)."""
    targets = [(i * 7) % 11 + 1 for i in range(n)]
    plans = [
        StepPlanSampler(targets, batch_size, accumulate, world_size, rank, seed=3)
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
