"""Streaming kill-and-resume through the real entry point: `data.streaming=true` with a seeded shuffle buffer,
SIGKILLed twice and resumed with `resume=auto`, trains the uninterrupted run's micro-batches (sample ids,
losses, learning rates) and ends with its adapter, bit for bit.

The chain of tests/training/test_resume.py (same recording and killing callbacks): killed after 5 steps with
last.ckpt every 3 steps (a mid-epoch resume from step 3), then after 7 steps with last.ckpt after every
validation (a resume from the save at the end of the stream's first pass, step 6); the stream has 24 rows,
batch 4: 6 steps per pass, 12 steps in all.
"""

from __future__ import annotations

import pytest

from tests.conftest import small_iso_data
from tests.training.test_resume import _records, assert_chain_trains_the_reference, kill_chain

pytestmark = pytest.mark.slow

STREAM = ("data.streaming=true", "data.shuffle_buffer=8", "trainer.max_steps=12")


def test_streaming_sigkill_and_resume_trains_the_uninterrupted_stream(tmp_path):
    data = [*small_iso_data(tmp_path), *STREAM]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    resumed_from = kill_chain(ref_dir, run_dir, data)
    assert resumed_from == [0, 3, 6]
    ref = _records(ref_dir)
    assert [r["step"] for r in ref] == list(range(12)) and [r["epoch"] for r in ref] == [0] * 6 + [1] * 6
    # A shuffled stream: not the file order, and the second pass is another order of the same rows.
    ids = [r["index"] for r in ref]
    first, second = sorted(i for b in ids[:6] for i in b), sorted(i for b in ids[6:] for i in b)
    assert first == second == list(range(24)) and ids[0] != [0, 1, 2, 3] and ids[:6] != ids[6:]
    assert_chain_trains_the_reference(ref_dir, run_dir, resumed_from)
