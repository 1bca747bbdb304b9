"""sftlab's own runner: SFTModule + SFTDataModule on Lightning's Trainer, composed as train.py composes them.

Differences from `python train.py`, all outside the training step: no logger (W&B would add its own process),
no checkpoint / early-stopping callbacks, no validation, `max_steps` = warm-up + measured steps, and the
`StepTimer` callback. Everything a step runs (sampler, collate, module hooks, loss, autocast, gradient
clipping, optimizer, scheduler) is the real path.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate

from sftlab import build
from sftlab.bench import runner
from sftlab.bench.callbacks import StepTimer
from sftlab.bench.hardware import flop_model, peak_memory_mb
from sftlab.bench.stats import Record

log = logging.getLogger(__name__)


def run_sftlab(spec: dict[str, Any]) -> dict:
    """spec: name, overrides (Hydra), workdir, steps (warm-up included), data (datamodule settings)."""
    p = runner.parts(spec)
    cfg, datamodule = p.cfg, runner.prepared_datamodule(p, spec)
    model, _ = build.adapted_model(p)
    module = build.module(cfg, model)
    timer = StepTimer()
    prec = runner.precision(cfg)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        precision=prec,
        logger=False,
        callbacks=[timer],
        max_steps=spec["steps"],
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=datamodule)
    extra = {
        "precision": str(prec),
        "device": str(module.device),
        "flops": asdict(flop_model(model)),
        "peak_memory_mb": peak_memory_mb(module.device),
        "adapter": cfg.adapter.name,
        "data": {k: v for k, v in spec.get("data", {}).items() if k != "cache_dir"},
    }
    return Record(spec["name"], timer.steps, extra).to_dict()
