"""Inputs that used to pass validation and break later (after the model loaded, or inside `fit()`): each is
now refused before anything loads with one message naming the key or file and the fix."""

from __future__ import annotations

import os
import shutil

import pytest

from sftlab import build
from sftlab.build import load_run
from sftlab.config import validate
from sftlab.errors import ConfigError, SFTLabError
from sftlab.training import checkpoint
from tests.conftest import ISO_DATA
from tests.reliability.conftest import train_in_process


def _problems(*overrides: str) -> str:
    cfg, origin = build.compose_with_origin(["model=tiny_random", *overrides], output_dir="/tmp/unused")
    with pytest.raises(ConfigError) as err:
        validate(cfg, origin)
    return str(err.value)


def test_no_validation_split_is_refused_before_loading(tmp_path):
    train = tmp_path / "train.jsonl"
    shutil.copy(ISO_DATA / "train.jsonl", train)
    message = _problems("data=jsonl", f"data.train_path={train}", "data.val_fraction=0")
    assert "training needs a validation split" in message and "data.val_fraction=0.05" in message


def test_own_training_data_with_the_bundled_evaluation_sets_is_refused(tmp_path):
    train = tmp_path / "train.jsonl"
    shutil.copy(ISO_DATA / "train.jsonl", train)
    message = _problems(f"data.train_path={train}")
    assert "data.val_path and data.test_path still point to the bundled ISO-date sets" in message
    assert "data=jsonl" in message
    # Saying so is allowed: the bundled files named as files.
    cfg, origin = build.compose_with_origin(
        [
            "model=tiny_random",
            f"data.train_path={train}",
            f"data.val_path={ISO_DATA / 'val.jsonl'}",
            f"data.test_path={ISO_DATA / 'test.jsonl'}",
        ],
        output_dir="/tmp/unused",
    )
    validate(cfg, origin)


def test_unreadable_data_paths_are_named_for_what_they_are(tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    message = _problems(f"data.train_path={tmp_path / 'folder.jsonl'}", f"data.val_path={loop}")
    assert "folder.jsonl'" in message and "a folder, not a file" in message
    assert "loop.jsonl'" in message and "a symlink loop" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_file_without_read_permission_is_refused(tmp_path):
    train = tmp_path / "train.jsonl"
    shutil.copy(ISO_DATA / "train.jsonl", train)
    train.chmod(0)
    assert "not readable (permission denied)" in _problems(f"data.train_path={train}")


def test_truncated_checkpoint_and_adapter_give_one_message_naming_the_file(tmp_path):
    from tests.conftest import make_adapter_run

    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    with pytest.raises(SFTLabError, match=r"last\.ckpt is not a readable checkpoint .*truncated"):
        checkpoint.resolve_resume(str(ckpt), tmp_path)

    run_dir, *_ = make_adapter_run(tmp_path / "run", [])
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(SFTLabError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        load_run(run_dir)
    (run_dir / "adapter" / "tokenizer.json").unlink()
    with pytest.raises(SFTLabError, match=r"adapter is incomplete"):
        load_run(run_dir)


def test_wandb_typo_drop_ratio_and_too_many_cpu_devices_are_refused():
    message = _problems(
        "+logger.wandb.projcet=demo",
        "data.max_drop_ratio=-1",
        "trainer.accelerator=cpu",
        f"trainer.devices={(os.cpu_count() or 1) + 1}",
    )
    assert "logger.wandb.projcet: unknown key" in message and "project" in message
    assert "data.max_drop_ratio=-1" in message and "a fraction in [0, 1]" in message
    assert f"trainer.devices={(os.cpu_count() or 1) + 1}" in message and "cores" in message
    # Keys W&B's init takes stay accepted.
    cfg, origin = build.compose_with_origin(
        ["model=tiny_random", "+logger.wandb.notes=hi", "+logger.wandb.job_type=train"], output_dir="/tmp"
    )
    validate(cfg, origin)


def test_a_validation_interval_longer_than_the_epoch_stops_before_the_model_loads(tmp_path, monkeypatch):
    """The smoke run's epoch is 6 micro-batches: an interval of 100 is refused by the real entry point as soon
    as the data is read, before the model loads (Lightning's own error came only inside `fit`)."""
    monkeypatch.setattr(build, "base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(
        ConfigError, match=r"val_check_interval=100: .* an epoch has 6 \(24 training examples"
    ):
        train_in_process(tmp_path / "run", tmp_path / "data", "trainer.val_check_interval=100")
