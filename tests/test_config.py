"""Bad configs are rejected before anything loads, all problems at once, each naming its key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sftlab import build
from sftlab.config import validate
from sftlab.errors import ConfigError
from tests.conftest import ROOT

CHOICES = {"optimizer": "adamw", "adapter": "lora", "model": "tiny_random"}
INVALID = [
    (["optimizer.lr=-1e-4"], "optimizer.lr=-0.0001", "must be a number > 0"),
    (["optimizer.lr=0"], "optimizer.lr=0", "must be a number > 0"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay=-0.1", ">= 0"),
    (["adapter.r=0"], "adapter.r=0", "integer >= 1"),
    (["adapter.r=abc"], "adapter.r='abc'", "must be of type int"),
    (["adapter.lora_dropout=1.0"], "adapter.lora_dropout=1.0", "[0, 1)"),
    (["adapter.lora_alpha=-8"], "adapter.lora_alpha=-8", "> 0"),
    (["+adapter.rank=8"], "adapter.rank: unknown key", "accepts: bias, lora_alpha"),
    (["+optimizer.betas1=0.9"], "optimizer.betas1: unknown key", "torch.optim.AdamW accepts"),
    (["+seeed=1"], "seeed: unknown top-level key", "`+seeed=...` typo"),
    (["+model.dtyp=float32"], "model.dtyp: unknown key", "allowed: "),
    (["model.dtype=float8"], "model.dtype='float8'", "float32, bfloat16, float16"),
    (["data.max_length=0"], "data.max_length=0", "integer >= 1"),
    (["data.batch_size=0"], "data.batch_size=0", "integer >= 1"),
    (["data.shuffle=maybe"], "data.shuffle='maybe'", "must be of type bool"),
    (["data.truncation=cut"], "data.truncation='cut'", "truncate, drop"),
    (["data.train_on=everything"], "data.train_on='everything'", "all_assistant"),
    (["data.train_path=/no/such/file.jsonl"], "data.train_path='/no/such/file.jsonl'", "file not found"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0", "integer >= 1"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0", "integer >= 1"),
    (["trainer.max_steps=0"], "trainer.max_steps=0", "-1 for no limit"),
    (["scheduler.kind=exponential"], "scheduler.kind='exponential'", "cosine, linear, constant"),
    (["scheduler.warmup=-1"], "scheduler.warmup=-1", ">= 0"),
    (["+trainer.max_epoch=3"], "trainer.max_epoch: unknown key", "pytorch_lightning.Trainer accepts"),
]


@pytest.mark.parametrize(("overrides", "key", "allowed"), INVALID, ids=[o[0][0] for o in INVALID])
def test_invalid_override_is_rejected_naming_key_value_and_rule(overrides, key, allowed):
    cfg = build.compose(["model=tiny_random", *overrides], output_dir="/tmp/unused")
    with pytest.raises(ConfigError) as info:
        validate(cfg, CHOICES)
    message = str(info.value)
    assert key in message and allowed in message
    assert "(1 problem(s))" in message  # one problem, reported once


def test_every_shipped_option_is_valid():
    for overrides in ([], ["adapter=qlora"], ["adapter=none", "optimizer=sgd"], ["experiment=smoke"]):
        validate(build.compose(["model=tiny_random", *overrides], output_dir="/tmp/unused"), CHOICES)


def test_all_problems_are_reported_together_and_the_source_file_named():
    cfg = build.compose(["optimizer.lr=-1", "adapter.r=0", "+foo=1"], output_dir="/tmp/unused")
    with pytest.raises(ConfigError, match=r"3 problem\(s\)") as info:
        validate(cfg, CHOICES)
    assert "conf/optimizer/adamw.yaml" in str(info.value) and "conf/adapter/lora.yaml" in str(info.value)


def test_train_py_rejects_before_loading_anything(tmp_path):
    """An empty model cache stays empty: the error comes before any model (or data) is touched."""
    cache = tmp_path / "cache"
    env = {**os.environ, "SFTLAB_CACHE": str(cache)}
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "optimizer.lr=-1",
            "+adapter.rank=3",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 1
    assert "optimizer.lr=-1" in proc.stderr + proc.stdout and "adapter.rank" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert not cache.exists()
