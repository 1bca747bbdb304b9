"""Exact resume after `kill -9`: same sample stream, same final adapter as an uninterrupted run.

The real entry point runs on the tiny model (24 examples, batch 4: 6 steps per epoch, 2 epochs, AdamW with
cosine warmup from `estimated_stepping_batches`, LoRA dropout on so RNG restore matters). A test callback,
loaded through Hydra like any callback, records every micro-batch's example ids and SIGKILLs its own process
at a chosen step; the chain is killed twice and resumed twice with `resume=auto` in the same run directory
(the run's checkpoint cadence may change between restarts; the training trajectory does not depend on it):
  * first process, last.ckpt every 3 steps, killed after 5 steps: it resumes from the batch-end save after
    step 3, mid-epoch, and redoes steps 4 and 5;
  * second process, last.ckpt after every validation (every 2 steps), killed after 7 steps: it resumes from
    the save after the validation at the end of epoch 0 (step 6) and redoes the first step of epoch 1.
Lightning's progress counters differ between a batch-end save and a save after validation, so the sampler
position is checked on both.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
from pathlib import Path

import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, small_iso_data, tiny_train_command


class RecordBatches(pl.Callback):
    """Appends `{"pid", "step", "epoch", "batch_idx", "index", "loss", "lr"}` per trained micro-batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {
            "pid": os.getpid(),
            "step": trainer.global_step - 1,
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "index": batch["index"].tolist(),
            "loss": float(outputs["loss"]),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class KillAt(pl.Callback):
    """SIGKILLs this process when the training batch of optimizer step `step` is about to run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _command(run_dir: Path, data: list[str], kill_at: int | None, extra: list[str]) -> list[str]:
    cmd = tiny_train_command(
        run_dir,
        "eval=none",
        *data,
        "data.batch_size=4",
        "adapter.lora_dropout=0.1",  # dropout draws random numbers: without the RNG restore, resume diverges
        "trainer.precision=32",
        "trainer.max_epochs=2",
        "trainer.val_check_interval=2",
        *extra,
        "callbacks.early_stopping.patience=100",
        "resume=auto",
        "+callbacks.record._target_=tests.training.test_resume.RecordBatches",
        f"+callbacks.record.path={run_dir / 'batches.jsonl'}",
    )
    if kill_at is not None:
        cmd += [
            "+callbacks.kill._target_=tests.training.test_resume.KillAt",
            f"+callbacks.kill.step={kill_at}",
        ]
    return cmd


def _start(run_dir: Path, data: list[str], kill_at: int | None = None, extra: tuple = ()) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in every run: bit-identical CPU math
    return subprocess.Popen(
        _command(run_dir, data, kill_at, list(extra)),
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "batches.jsonl").read_text().splitlines()]


def _csv_rows(run_dir: Path) -> list[dict]:
    """csv/metrics.csv without the columns that differ from run to run."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        skip = ("_per_s", "_mb")  # throughput and peak memory
        return [{k: v for k, v in row.items() if not k.endswith(skip)} for row in csv.DictReader(f)]


def kill_chain(ref_dir: Path, run_dir: Path, data: list[str]) -> list[int]:
    """An uninterrupted run in `ref_dir`, beside (two CPU cores) a chain in `run_dir` killed after 5 steps
    with last.ckpt every 3 steps, then after 7 steps, then resumed to the end; returns the steps each part
    of the chain started from."""
    reference = _start(ref_dir, data)
    resumed_from = []
    every_3_steps = ("callbacks.last_checkpoint.every_n_train_steps=3",)
    for kill_at, extra in ((5, every_3_steps), (7, ()), (None, ())):
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        resumed_from.append(torch.load(ckpt, weights_only=True)["global_step"] if ckpt.exists() else 0)
        code, out = _finish(_start(run_dir, data, kill_at, extra))
        assert code == (-signal.SIGKILL if kill_at else 0), out[-3000:]
    code, out = _finish(reference)
    assert code == 0, out[-3000:]
    return resumed_from


def assert_chain_trains_the_reference(ref_dir: Path, run_dir: Path, resumed_from: list[int]) -> None:
    """Each process of the chain trained the reference's micro-batches from its checkpoint on (no repeat, no
    skip, the same loss and learning rate, bit for bit), the last one to step 11, and the saved adapters are
    equal."""
    ref = _records(ref_dir)
    segments: dict[int, list[dict]] = {}
    for r in _records(run_dir):
        segments.setdefault(r["pid"], []).append(r)
    starts = [seg[0]["step"] for seg in segments.values()]
    assert starts == resumed_from
    for seg, start in zip(segments.values(), starts, strict=True):
        strip = [{k: v for k, v in r.items() if k != "pid"} for r in seg]
        expected = [{k: v for k, v in r.items() if k != "pid"} for r in ref[start : start + len(seg)]]
        assert strip == expected
    assert segments[list(segments)[-1]][-1]["step"] == 11

    ref_adapter = load_file(ref_dir / "adapter" / "adapter_model.safetensors")
    got_adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert ref_adapter.keys() == got_adapter.keys()
    for name, tensor in ref_adapter.items():
        assert torch.equal(tensor, got_adapter[name]), name


def test_sigkill_mid_epoch_and_at_epoch_boundary_resume_exactly(tmp_path):
    data = small_iso_data(tmp_path)
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    resumed_from = kill_chain(ref_dir, run_dir, data)
    assert resumed_from == [0, 3, 6]
    ref = _records(ref_dir)
    assert len(ref) == 12 and [r["step"] for r in ref] == list(range(12))
    assert_chain_trains_the_reference(ref_dir, run_dir, resumed_from)
    ref_last = torch.load(ref_dir / "checkpoints" / "last.ckpt", weights_only=True)
    got_last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ref_last["global_step"] == got_last["global_step"] == 12
    for name, tensor in ref_last["state_dict"].items():
        assert torch.equal(tensor, got_last["state_dict"][name]), name
    ref_lr = ref_last["lr_schedulers"][0]["_last_lr"]
    assert ref_lr == got_last["lr_schedulers"][0]["_last_lr"]
    # The metrics file of the twice-killed run is the uninterrupted one's, row for row: nothing from before a
    # restart lost (Lightning's CSVLogger deletes the file), nothing replayed logged twice.
    ref_rows = _csv_rows(ref_dir)
    # Six validations, and train loss and learning rate every 5 steps (log_every_n_steps): 10 rows.
    assert [bool(r["val/loss"]) for r in ref_rows].count(True) == 6 and len(ref_rows) == 10
    assert _csv_rows(run_dir) == ref_rows
