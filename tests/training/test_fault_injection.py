"""Fault injection: SIGKILL at 5 random points, one of them inside a checkpoint write, each followed by
`resume=auto`; the chain ends with the same adapter, bit for bit, as an uninterrupted run.

Uses the resume test's harness (tiny model, 24 examples, 12 steps over 2 epochs, LoRA dropout on). The kill
steps are drawn with a fixed seed so a failure reproduces; the first process dies while pickling its second
full checkpoint (KillDuringSecondSave), the next four at random optimizer steps.
"""

from __future__ import annotations

import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import small_iso_data
from tests.training.test_resume import _finish, _records, _start

SEED = 0
DURING_SAVE = ("+callbacks.bomb._target_=tests.training.test_checkpoint.KillDuringSecondSave",)


@pytest.mark.slow  # 77 s of six runs; test_resume's SIGKILL test keeps kill-and-resume in the fast suite
def test_five_random_kills_one_inside_a_checkpoint_write_resume_to_the_same_adapter(tmp_path):
    data = small_iso_data(tmp_path)
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    reference = _start(ref_dir, data)
    # Full checkpoints every 2 steps (after each validation): the second is written at step 4.
    kill_steps = sorted(random.Random(SEED).sample(range(5, 12), 4))
    plan = [(None, DURING_SAVE), *((step, ()) for step in kill_steps), (None, ())]
    for i, (kill_at, extra) in enumerate(plan):
        code, out = _finish(_start(run_dir, data, kill_at, extra))
        last = i == len(plan) - 1
        assert code == (0 if last else -signal.SIGKILL), f"process {i} (kill at {kill_at}): {out[-3000:]}"
    assert _finish(reference)[0] == 0

    ref_steps = [r["step"] for r in _records(ref_dir)]
    trained = _records(run_dir)
    assert ref_steps == list(range(12))
    assert {r["step"] for r in trained} == set(range(12))  # every step trained, none skipped
    by_step = {r["step"]: r for r in _records(ref_dir)}
    for r in trained:  # every (re)trained step saw the reference's examples, loss and learning rate
        assert {k: v for k, v in r.items() if k != "pid"} == {
            k: v for k, v in by_step[r["step"]].items() if k != "pid"
        }
    assert len({r["pid"] for r in trained}) == len(plan)

    ref_adapter = load_file(ref_dir / "adapter" / "adapter_model.safetensors")
    got_adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert ref_adapter.keys() == got_adapter.keys()
    for name, tensor in ref_adapter.items():
        assert torch.equal(tensor, got_adapter[name]), name
