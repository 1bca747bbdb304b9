"""The objects every runner shares, built the way `sftlab.train.run` builds them (same calls, same order)."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sftlab.data.datamodule import SFTDataModule
from sftlab.model.load import load_model, load_tokenizer, model_source
from sftlab.model.tokens import add_special_tokens, fit_embeddings
from sftlab.train import CONF_DIR, resolve_precision

log = logging.getLogger(__name__)


def compose_cfg(overrides: list[str], output_dir: str | Path) -> DictConfig:
    """conf/train.yaml + overrides, as `python train.py` composes it (no Hydra run dir: outside a Hydra app
    `${hydra:runtime.output_dir}` cannot resolve, so it is made concrete)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    OmegaConf.update(cfg, "paths.output_dir", str(output_dir))
    return cfg


@dataclass
class Parts:
    cfg: DictConfig
    source: str
    tokenizer: Any
    template: Any
    token_ids: list[int]


def parts(cfg: DictConfig) -> Parts:
    source = model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, source)
    token_ids = add_special_tokens(tokenizer, cfg.model.get("special_tokens"))
    template = instantiate(cfg.template, _convert_="all")
    return Parts(cfg, source, tokenizer, template, token_ids)


def runner_parts(spec: dict[str, Any]) -> Parts:
    """A runner's parts from its spec: the config (scratch output dir `<workdir>/<name>`), seeded as
    train.py seeds, then tokenizer and template."""
    cfg = compose_cfg(spec["overrides"], Path(spec["workdir"]) / spec["name"].replace("/", "-"))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    return parts(cfg)


def prepared_datamodule(p: Parts, spec: dict[str, Any]) -> SFTDataModule:
    """The datamodule with the spec's `data` settings, set up for fit."""
    dm = datamodule(p, **spec.get("data", {}))
    dm.setup("fit")
    return dm


def datamodule(p: Parts, **settings: Any) -> SFTDataModule:
    """`instantiate(cfg.data)` with `settings` (e.g. packing=True) applied where the datamodule takes them;
    a setting it does not know is logged and skipped, so the bench runs against older datamodules too."""
    known = inspect.signature(SFTDataModule).parameters
    unknown = sorted(set(settings) - set(known))
    if unknown:
        log.warning("SFTDataModule takes no %s: benchmark setting ignored", unknown)
    kwargs = {k: v for k, v in settings.items() if k in known}
    return instantiate(p.cfg.data, _partial_=True)(tokenizer=p.tokenizer, template=p.template, **kwargs)


def base_model(p: Parts, adapter: Any) -> torch.nn.Module:
    model = load_model(p.cfg.model, p.source, quantization_config=adapter.quantization_config())
    fit_embeddings(model, p.tokenizer)
    return model


def adapted_model(p: Parts) -> tuple[torch.nn.Module, Any]:
    """(model with the configured adapter applied, the adapter option)."""
    adapter = instantiate(p.cfg.adapter, _convert_="all")
    model = adapter.apply(base_model(p, adapter), new_token_ids=p.token_ids)
    return model, adapter


def precision(cfg: DictConfig) -> str | int:
    return resolve_precision(cfg.trainer.precision)


def autocast_dtype(prec: str | int) -> torch.dtype | None:
    """The autocast dtype Lightning uses for a precision setting; None for full precision."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(prec))
