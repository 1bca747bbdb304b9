"""Every option of every config group composes, and experiments are found in experiments/."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sftlab import build
from sftlab.paths import config_dir
from tests.conftest import ROOT

GROUPS = sorted(
    p.name for p in config_dir().iterdir() if p.is_dir() and p.name not in ("hydra", "experiment")
)
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((config_dir() / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    cfg = build.compose([f"{group}={option}"], output_dir="/tmp/x")
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml")))
def test_every_experiment_composes(name):
    cfg = build.compose([f"experiment={name}"], output_dir="/tmp/x")
    assert cfg.tags


def test_model_chooses_its_template_unless_overridden():
    assert build.compose(["model=mistral7b"]).template.name == "mistral"
    assert build.compose(["model=mistral7b", "template=chatml"]).template.name == "chatml"


def test_cfg_job_prints_without_loading_anything():
    out = subprocess.run(
        [sys.executable, "train.py", "model=mistral7b", "adapter=qlora", "--cfg", "job"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "mistralai/Mistral-7B-v0.3" in out and "sftlab.model.adapters.QLoRA" in out
