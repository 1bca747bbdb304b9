"""Every option of every config group composes, experiments are found in experiments/, and the defaults-list
order that options rely on holds."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

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
    # Every interpolation resolves and every `???` of a base (conf/model_defaults.yaml) is filled.
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml")))
def test_every_experiment_composes(name):
    cfg = build.compose([f"experiment={name}"], output_dir="/tmp/x")
    assert cfg.tags


ORDER = (
    "conf/train.yaml must list `template` before `model` in its defaults list: a model option picks its "
    "template with `override /template@_global_.template: <name>`, and Hydra can only override a group that "
    "is already in the defaults list when the model's own list is read. With `model` first every model that "
    "picks a template fails to compose ('Could not override template')."
)
TEMPLATE_OF = {  # what each model option picks; the others keep train.yaml's default (chatml)
    "falcon7b": "alpaca",
    "gemma2_2b": "gemma",
    "llama3_8b": "llama3",
    "mistral7b": "mistral",
    "qwen2_5_7b": "chatml",
}


def test_template_comes_before_model_in_the_defaults_list():
    defaults = OmegaConf.to_container(OmegaConf.load(config_dir() / "train.yaml").defaults)
    entries = [next(iter(e)) if isinstance(e, dict) else e for e in defaults]
    assert entries.index("template") < entries.index("model"), ORDER


@pytest.mark.parametrize("model", sorted(p.stem for p in (config_dir() / "model").glob("*.yaml")))
def test_model_chooses_its_template_unless_overridden(model):
    try:
        chosen = build.compose([f"model={model}"]).template.name
        overridden = build.compose([f"model={model}", "template=tokenizer"]).template.name
    except HydraException as err:
        pytest.fail(f"{ORDER}\nHydra said: {err}")
    assert (chosen, overridden) == (TEMPLATE_OF.get(model, "chatml"), "tokenizer")


def test_lora_family_options_extend_lora_and_python_defaults_are_the_shipped_ones():
    """One place for adapter defaults: conf/adapter/lora.yaml. The other LoRA options restate none of its
    keys, and the dataclasses default to the shipped values (`LoRA()` is `adapter=lora`)."""
    from hydra.utils import instantiate

    from sftlab.model.adapters import LoRA, LoRA8bit, QLoRA

    lora_keys = set(OmegaConf.load(config_dir() / "adapter" / "lora.yaml")) - {"_target_", "name"}
    for option in ("dora", "rslora", "qlora", "lora8bit"):
        own = OmegaConf.load(config_dir() / "adapter" / f"{option}.yaml")
        assert list(own.defaults) == ["lora", "_self_"], option
        restated = lora_keys & set(own) - {"r", "lora_alpha", "use_dora", "use_rslora"}
        assert not restated, f"adapter/{option}.yaml restates {restated}"
        assert build.compose([f"adapter={option}"]).adapter.lora_dropout == 0.0
    for option, cls in (("lora", LoRA), ("qlora", QLoRA), ("lora8bit", LoRA8bit)):
        assert instantiate(build.compose([f"adapter={option}"]).adapter, _convert_="all") == cls(), option


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
