"""Shared fixtures. Unit tests use a tiny random Llama with the real SmolLM2 tokenizer; integration tests
(marked slow) use the real SmolLM2-135M-Instruct. Nothing touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from sftlab.train import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_cfg(overrides: list[str], output_dir: Path | str | None = None) -> DictConfig:
    """Compose conf/train.yaml exactly as `python train.py` would, with `paths.output_dir` made concrete
    (outside a Hydra app `${hydra:runtime.output_dir}` cannot resolve)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=False)
    if output_dir is not None:
        OmegaConf.update(cfg, "paths.output_dir", str(output_dir))
    return cfg


@pytest.fixture(scope="session")
def tiny_cfg() -> DictConfig:
    return compose_cfg(["model=tiny_random"])


@pytest.fixture(scope="session")
def tokenizer(tiny_cfg):
    """The real SmolLM2 tokenizer (from the converted embedded model)."""
    from sftlab.model.load import load_tokenizer

    return load_tokenizer(tiny_cfg.model)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_cfg) -> str:
    from sftlab.model.load import model_source

    return model_source(tiny_cfg.model)


@pytest.fixture
def tiny_model(tiny_cfg, tiny_model_dir):
    from sftlab.model.load import load_model

    return load_model(tiny_cfg.model, tiny_model_dir)


@pytest.fixture(scope="session")
def chatml(tiny_cfg):
    from hydra.utils import instantiate

    return instantiate(tiny_cfg.template, _convert_="all")
