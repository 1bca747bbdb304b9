"""Bad configs are rejected before anything loads, all problems at once, each naming its key and file,
wherever on Hydra's search path the file lies."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sftlab import build
from sftlab.config import Origin, validate
from sftlab.errors import ConfigError
from tests.conftest import ROOT


def check(overrides: list[str]) -> None:
    validate(*build.compose_with_origin(["model=tiny_random", *overrides], output_dir="/tmp/unused"))


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
    (["+model.dtyp=float32"], "model.dtyp: unknown key", "did you mean dtype?"),
    (
        ["+model.flash=true"],
        "model.flash: unknown key",
        "allowed: allow_cpu, allow_pickle, attn_implementation",
    ),
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
    (["data.reasoning=keep"], "data.reasoning='keep'", "keep_last, keep_all, drop"),
    (["eval=generate", "eval.generate.reasoning=hide"], "eval.generate.reasoning='hide'", "strip, show"),
    (["+trainer.max_epoch=3"], "trainer.max_epoch: unknown key", "pytorch_lightning.Trainer accepts"),
    (["eval_precision=fp16"], "eval_precision='fp16'", "auto, 32, bf16-mixed, 16-mixed"),
    (["logger=csv", "logger.csv=null"], "callbacks.lr_monitor", "callbacks.lr_monitor=null"),
]


@pytest.mark.parametrize(("overrides", "key", "allowed"), INVALID, ids=[o[0][0] for o in INVALID])
def test_invalid_override_is_rejected_naming_key_value_and_rule(overrides, key, allowed):
    with pytest.raises(ConfigError) as info:
        check(overrides)
    message = str(info.value)
    assert key in message and allowed in message
    assert "(1 problem(s))" in message  # one problem, reported once


def test_every_shipped_option_is_valid():
    for overrides in (
        [],
        ["adapter=qlora"],
        ["adapter=none", "optimizer=sgd"],
        ["experiment=smoke"],
        ["eval_precision=32"],  # an int to Hydra
    ):
        check(overrides)


def test_all_problems_are_reported_together_and_the_source_file_named():
    with pytest.raises(ConfigError, match=r"3 problem\(s\)") as info:
        check(["optimizer.lr=-1", "adapter.r=0", "+foo=1"])
    assert f"{ROOT}/conf/optimizer/adamw.yaml" in str(info.value)
    assert f"{ROOT}/conf/adapter/lora.yaml" in str(info.value)


def test_a_key_an_option_inherits_is_blamed_on_the_file_that_sets_it():
    """dora.yaml extends lora.yaml: `r` is written in lora.yaml, `use_dora` in dora.yaml."""
    with pytest.raises(ConfigError) as info:
        check(["adapter=dora", "adapter.r=0", "adapter.use_dora=maybe"])
    message = str(info.value)
    assert f"adapter.r=0 ({ROOT}/conf/adapter/lora.yaml or the command line)" in message
    assert f"adapter.use_dora='maybe' ({ROOT}/conf/adapter/dora.yaml or the command line)" in message


def test_allow_cpu_is_a_documented_model_key():
    """Set without `+` (it is in conf/model_defaults.yaml, with its meaning), and valid."""
    cfg, origin = build.compose_with_origin(["model=mistral7b", "model.allow_cpu=true"], output_dir="/tmp/u")
    assert cfg.model.allow_cpu is True
    validate(cfg, origin)
    assert build.compose(["model=mistral7b"]).model.allow_cpu is False
    base = (ROOT / "conf/model_defaults.yaml").read_text()
    assert "allow_cpu: false" in base and "3B parameters" in base


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


# ---- a config dir of the user's own, on Hydra's search path ------------------------------------------------
USER_MODEL = """\
defaults:
  - /model_defaults@_here_
  - _self_

name: mymodel
name_or_path: /models/mymodel
context_length: 4096
rope_note: yarn x4          # a key of its own (read by the user's code)
"""
USER_GROUP = """\
_target_: textwrap.TextWrapper
width: 40
"""


def user_config_dir(folder, model: str = USER_MODEL, group: str = USER_GROUP):
    (folder / "model").mkdir(parents=True)
    (folder / "mygroup").mkdir()
    (folder / "model" / "mymodel.yaml").write_text(model)
    (folder / "mygroup" / "thing.yaml").write_text(group)
    return folder


def compose_user(folder, *overrides: str):
    return build.compose_with_origin(
        [f"hydra.searchpath=[file://{folder}]", "model=mymodel", "+mygroup=thing", *overrides],
        output_dir="/tmp/u",
    )


def test_options_keys_and_groups_of_a_user_config_dir_are_accepted(tmp_path):
    cfg, origin = compose_user(user_config_dir(tmp_path))
    assert (cfg.model.rope_note, cfg.model.dtype, cfg.mygroup.width) == ("yarn x4", "bfloat16", 40)
    validate(cfg, origin)
    # Checked against the shipped conf/ alone, the same config is wrong twice: why validation follows Hydra.
    with pytest.raises(
        ConfigError, match=r"mygroup: unknown top-level key[\s\S]*model.rope_note: unknown key"
    ):
        validate(cfg, Origin.shipped(origin.choices))


def test_a_typo_in_a_user_file_is_rejected_naming_that_file(tmp_path):
    model = USER_MODEL.replace(
        "context_length: 4096", "context_length: 4096\ndtype: bfloat61\ndtyep: float32"
    )
    folder = user_config_dir(tmp_path, model=model, group=USER_GROUP.replace("width", "widht"))
    with pytest.raises(ConfigError) as info:
        validate(*compose_user(folder))
    message, model_file = str(info.value), folder.resolve() / "model" / "mymodel.yaml"
    assert "(3 problem(s))" in message
    assert f"model.dtyep: unknown key ({model_file} or the command line); did you mean dtype?" in message
    assert f"model.dtype='bfloat61' ({model_file} or the command line): must be one of" in message
    assert f"mygroup.widht: unknown key ({folder.resolve() / 'mygroup' / 'thing.yaml'}" in message


def test_train_py_validates_a_config_dir_given_with_config_dir(tmp_path):
    """`--config-dir`: the user's model and group are accepted (only the two real problems are reported),
    and the problem in the user's file names it."""
    folder = user_config_dir(tmp_path / "conf", model=USER_MODEL + "dtype: float8\n")
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config-dir",
            str(folder),
            "model=mymodel",
            "+mygroup=thing",
            "optimizer.lr=-1",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "(2 problem(s))" in out, out
    assert "optimizer.lr=-1" in out
    assert f"model.dtype='float8' ({folder.resolve() / 'model' / 'mymodel.yaml'} or the command line)" in out


# ---- devices, strategies and kernels ---------------------------------------------------------------------
INCOMPATIBLE = [
    (
        ["trainer=fsdp", "trainer.accelerator=cpu"],
        "trainer.strategy (",
        "=pytorch_lightning.strategies.FSDPStrategy with trainer.accelerator=cpu: FSDP needs CUDA GPUs",
    ),
    (
        ["trainer=deepspeed", "trainer.accelerator=cpu"],
        "trainer.strategy (",
        "=pytorch_lightning.strategies.DeepSpeedStrategy with trainer.accelerator=cpu: DeepSpeed",
    ),
    (
        ["trainer.accelerator=cpu", "trainer.precision=16-mixed"],
        "trainer.precision (",
        "=16-mixed with trainer.accelerator=cpu: fp16",
    ),
    (
        ["trainer.accelerator=cpu", "model.attn_implementation=flash_attention_2"],
        "model.attn_implementation (",
        "=flash_attention_2 with trainer.accelerator=cpu: flash-attention kernels need a CUDA GPU",
    ),
    (
        ["adapter=qlora", "trainer=deepspeed", "trainer.strategy.stage=3"],
        "adapter (",
        "ZeRO stage 3",
    ),
    (["adapter=qlora", "trainer=fsdp"], "adapter.quant_storage (", "=uint8 with trainer.strategy"),
    (["adapter=lora8bit", "trainer=fsdp"], "adapter (", "FSDP cannot shard 8-bit"),
    (
        ["data.packing=true", "model.attn_implementation='paged|sdpa'"],
        "data.packing (",
        "=true with model.attn_implementation (",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "key", "says"), INCOMPATIBLE, ids=[" ".join(o[0]) for o in INCOMPATIBLE]
)
def test_incompatible_device_choices_are_rejected_naming_the_keys(overrides, key, says):
    with pytest.raises(ConfigError) as info:
        check(overrides)
    message = str(info.value)
    assert key in message and says in message, message
    assert "(1 problem(s))" in message


def test_compatible_device_choices_pass_validation_on_any_machine():
    for overrides in (
        ["adapter=qlora", "trainer=fsdp", "adapter.quant_storage=bfloat16"],
        ["adapter=qlora", "trainer=deepspeed"],
        [
            "data.packing=true",
            "trainer=gpu",
            "trainer.precision=16-mixed",
            "model.attn_implementation=flash_attention_2",
        ],
        ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
    ):
        check(overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA refuses")
def test_preflight_refuses_gpu_choices_on_a_machine_without_cuda(tmp_path):
    cfg, origin = build.compose_with_origin(["model=tiny_random", "trainer=fsdp"], output_dir=tmp_path)
    with pytest.raises(ConfigError) as info:
        build.preflight(cfg, tmp_path, origin)
    assert "trainer.accelerator=gpu and this machine has no CUDA device: FSDP needs CUDA GPUs" in str(
        info.value
    )
    cfg, origin = build.compose_with_origin(["model=tiny_random", "trainer=gpu"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.accelerator \(.*\)=gpu: no CUDA device is visible"):
        build.preflight(cfg, tmp_path, origin)
    cfg, origin = build.compose_with_origin(["model=tiny_random"], output_dir=tmp_path)
    build.check_devices(cfg, origin)  # accelerator=auto falls back to the CPU
