"""What every benchmark runner shares, built through `sftlab.build`: the same calls, in the same order, as
sftlab-train makes them."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from sftlab import build
from sftlab.data.datamodule import SFTDataModule

log = logging.getLogger(__name__)


def parts(spec: dict[str, Any]) -> build.Parts:
    """A runner's parts from its spec: the config (scratch output dir `<workdir>/<name>`), seeded as
    sftlab-train seeds, then tokenizer and template."""
    cfg = build.compose(spec["overrides"], Path(spec["workdir"]) / spec["name"].replace("/", "-"))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    return build.parts(cfg)


def prepared_datamodule(p: build.Parts, spec: dict[str, Any], setup: bool = True) -> SFTDataModule:
    """The datamodule with the spec's `data` settings; a setting the datamodule does not take is logged and
    skipped, so the bench runs against older datamodules too."""
    settings = spec.get("data", {})
    known = inspect.signature(SFTDataModule).parameters
    unknown = sorted(set(settings) - set(known))
    if unknown:
        log.warning("SFTDataModule takes no %s: benchmark setting ignored", unknown)
    return build.datamodule(p, setup=setup, **{k: v for k, v in settings.items() if k in known})


def precision(cfg: DictConfig) -> str | int:
    return build.resolve_precision(cfg.trainer.precision)


def autocast_dtype(prec: str | int) -> torch.dtype | None:
    """The autocast dtype Lightning uses for a precision setting; None for full precision."""
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(prec))
