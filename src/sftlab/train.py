"""`python train.py`: compose -> validate -> load -> evaluate base -> fit -> restore best -> save -> evaluate.

Reads top to bottom; each step is one call into the module that owns it. `main` returns the best validation
loss so Hydra sweepers (Optuna) can minimize it.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from sftlab import artifacts, console, tracking
from sftlab.callbacks import resolve_resume
from sftlab.config import validate
from sftlab.errors import SFTLabError
from sftlab.eval.suite import EvalSuite, build_suite
from sftlab.model.adapters import trainable_parameters
from sftlab.model.load import (
    check_available,
    check_context_length,
    check_hardware,
    load_model,
    load_tokenizer,
    model_source,
)
from sftlab.model.tokens import add_special_tokens, fit_embeddings
from sftlab.module import SFTModule

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def resolve_precision(precision: str | int) -> str | int:
    """`auto`: bf16 autocast where the hardware does bf16 (about 1.5x faster on such CPUs), else fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def is_rank_zero() -> bool:
    """Under DDP Lightning starts the other ranks by running this same command; they load and train, but only
    rank 0 writes the run directory and evaluates. The rank comes from the environment, known at import."""
    return rank_zero_only.rank == 0


def evaluate(suite: EvalSuite | None, model: torch.nn.Module, tag: str) -> dict:
    """Run the chosen `eval` options on `model` as `tag`; all results so far: {"base": ..., "tuned": ...}."""
    return {} if suite is None else suite.run(model, tag)  # the suite logs each evaluator as it starts


def preflight(cfg: DictConfig, run_dir: Path) -> str:
    """What can fail in seconds fails here, before a model or dataset loads. Returns the model dir."""
    validate(cfg, HydraConfig.get().runtime.choices if HydraConfig.initialized() else None)
    artifacts.check_writable(run_dir)
    source = model_source(cfg.model)
    check_available(source, cfg.model)
    check_hardware(source, cfg.model)
    check_context_length(cfg.model, cfg.data.get("max_length"))
    return source


def build_data(cfg: DictConfig, source: str):
    log.info("Instantiating tokenizer, template and data <%s>", cfg.data._target_)
    tokenizer = load_tokenizer(cfg.model, source)
    new_token_ids = add_special_tokens(tokenizer, cfg.model.get("special_tokens"))  # before data is tokenized
    template = instantiate(cfg.template, _convert_="all")
    # Partial, then call: Hydra would turn a dataclass passed as a kwarg into a config node.
    datamodule = instantiate(cfg.data, _partial_=True)(tokenizer=tokenizer, template=template)
    datamodule.setup("fit")
    return tokenizer, template, datamodule, new_token_ids


def build_module(cfg: DictConfig, model: torch.nn.Module) -> SFTModule:
    """The LightningModule around the (adapted) model; sftlab-bench builds its runs with this too."""
    return SFTModule(
        model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
        gradient_checkpointing=cfg.gradient_checkpointing,
        compile=cfg.compile,
    )


def build_trainer(cfg: DictConfig, loggers: list) -> pl.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    return instantiate(
        cfg.trainer, precision=resolve_precision(cfg.trainer.precision), logger=loggers, callbacks=callbacks
    )


def run(cfg: DictConfig) -> float:
    started, run_dir = time.time(), Path(cfg.paths.output_dir)
    source = preflight(cfg, run_dir)
    if is_rank_zero():
        console.print_config(cfg)
        artifacts.write_config(run_dir, cfg)
    pl.seed_everything(cfg.seed, workers=True)
    tokenizer, template, datamodule, new_token_ids = build_data(cfg, source)
    suite = build_suite(cfg.get("eval"), tokenizer, template, datamodule.splits, run_dir / "eval")

    log.info("Instantiating model <%s> with adapter <%s>", source, cfg.adapter._target_)
    adapter = instantiate(cfg.adapter, _convert_="all")
    model = load_model(cfg.model, source, quantization_config=adapter.quantization_config())
    fit_embeddings(model, tokenizer)
    evals = evaluate(suite, model, "base") if is_rank_zero() and suite and suite.compare_base else {}
    model = adapter.apply(model, new_token_ids=new_token_ids)
    trainable, total = trainable_parameters(model)
    params = {"trainable": trainable, "total": total}
    log.info("Parameters: %d trainable of %d (%.3f%%)", trainable, total, 100 * trainable / total)
    module = build_module(cfg, model)

    loggers = tracking.make_loggers(cfg.get("logger"))
    trainer = build_trainer(cfg, loggers)
    for lg in loggers:
        lg.log_hyperparams(
            {
                **artifacts.resolved_config(cfg),
                "params": params,
                "data_counts": datamodule.counts(),
            }
        )
    try:
        # weights_only: a checkpoint is data, never code to unpickle.
        trainer.fit(
            module,
            datamodule=datamodule,
            ckpt_path=resolve_resume(cfg.get("resume"), run_dir),
            weights_only=True,
        )
        if not is_rank_zero():
            return math.nan  # the other DDP ranks are done: rank 0 saves, evaluates and reports
        best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
        artifacts.restore_best(module, best_path)
        log.info("Saved %s", artifacts.save_model(run_dir, module.model, tokenizer, template))
        evals = evaluate(suite, module.model, "tuned") or evals
        metrics = artifacts.final_metrics(
            trainer,
            eval=evals,
            data=datamodule.counts(),
            params=params,
            best_checkpoint=best_path,
            runtime_s=round(time.time() - started, 1),
        )
        artifacts.write_json(run_dir / "metrics.json", metrics)
        tracking.log_summary(loggers, {"eval": evals, "val/best_loss": metrics["val"]["best_loss"]})
        tracking.log_eval_tables(loggers, suite)
    finally:
        sync_hint = tracking.finish(loggers)
    if evals:
        console.print_comparison(evals)
    if sync_hint:
        log.info("W&B ran offline. Upload with: %s", sync_hint)
    log.info("Run directory: %s", run_dir)
    return metrics["val"]["best_loss"]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except Exception as err:
        if tracking.in_sweep():
            # One failing sweep job must not stop the others: logged, error.txt in its dir, NaN returned.
            return tracking.record_failure(Path(cfg.paths.output_dir), err)
        if not isinstance(err, SFTLabError):
            raise
        # A problem the user can fix: one message, not a library traceback.
        log.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
