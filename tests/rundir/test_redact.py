"""Secrets never reach what a run writes; inputs are never modified; safe loading defaults."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sftlab import build
from sftlab.rundir.redact import MASK, redact
from tests.conftest import ROOT

SECRETS = {
    "WANDB_API_KEY": "wandb-secret-0123456789abcdef",
    "HF_TOKEN": "hf_secretTOKEN0123456789",
    "OPENAI_API_KEY": "sk-secret-openai-0123456789",
    "JUDGE_API_KEY": "judge-secret-0123456789",
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_redact_masks_credential_keys_and_secret_values(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRETS["OPENAI_API_KEY"])
    data = {
        "judge": {
            "api_key": "abc",
            "api_key_env": "OPENAI_API_KEY",
            "note": f"x{SECRETS['OPENAI_API_KEY']}y",
        },
        "special": {"pad_token": "<pad>"},
        "n": 3,
        "list": [SECRETS["OPENAI_API_KEY"]],
    }
    assert redact(data) == {
        "judge": {"api_key": MASK, "api_key_env": "OPENAI_API_KEY", "note": f"x{MASK}y"},
        "special": {"pad_token": "<pad>"},
        "n": 3,
        "list": [MASK],
    }


def test_no_secret_anywhere_in_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    data_file = ROOT / "src/sftlab/resources/iso_dates/train.jsonl"
    before = _sha(data_file)
    # The user interpolates a secret into a config value: config.yaml must still not hold it.
    env = {**os.environ, **SECRETS, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "experiment=smoke",
            "logger=wandb",
            "task_name=${oc.env:OPENAI_API_KEY}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and (run_dir / "config.yaml").is_file()
    for path in files:
        blob = path.read_bytes()
        for name, value in SECRETS.items():
            assert value.encode() not in blob, f"{name} leaked into {path.relative_to(run_dir)}"
    for output in (proc.stdout, proc.stderr):
        assert not any(v in output for v in SECRETS.values())
    assert _sha(data_file) == before  # inputs are never modified


@pytest.mark.parametrize("model", sorted(p.stem for p in (ROOT / "conf/model").glob("*.yaml")))
def test_models_default_to_no_remote_code_and_no_pickle(model):
    cfg = build.compose([f"model={model}"])
    assert cfg.model.trust_remote_code is False
    assert cfg.model.allow_pickle is False


def test_unwritable_or_full_output_directory_is_reported_before_training(tmp_path):
    from sftlab.errors import SFTLabError
    from sftlab.rundir.write import check_writable

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SFTLabError, match="is not writable"):
        check_writable(blocker / "run")
    with pytest.raises(SFTLabError, match="MiB free on its disk"):
        check_writable(tmp_path / "run", min_free=1 << 62)
    check_writable(tmp_path / "run")  # an ordinary directory passes


def test_serve_binds_to_loopback_unless_told_otherwise():
    from sftlab.cli.serve import ServeArgs

    assert ServeArgs().host == "127.0.0.1"
