"""`sftlab-train` / `python train.py`: compose, check, build, evaluate the base, fit, restore the best, save,
evaluate the tuned model.

Reads top to bottom; each step is one call into the module that owns it (`sftlab.build` makes every object).
`main` returns the best validation loss so Hydra sweepers (Optuna) can minimize it.

Only Hydra is imported at module level: `--help`, `--cfg job`, a config error and shell completion are
answered before torch, Lightning or transformers load (`run` imports them).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from sftlab import paths
from sftlab.cli import plugins, sweep
from sftlab.errors import SFTLabError

log = logging.getLogger(__name__)


def is_rank_zero() -> bool:
    """Under DDP Lightning starts the other ranks by running this same command; they load and train, but only
    rank 0 writes the run directory and evaluates. The rank comes from the environment, known at import."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    # Until the Trainer exists, Lightning knows the rank only from RANK / LOCAL_RANK / SLURM_PROCID; a node
    # started by hand or by a launcher with one process per node has only NODE_RANK (GROUP_RANK: torchrun).
    node = int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or 0)
    return rank_zero_only.rank == 0 and node == 0


def run(cfg: DictConfig) -> float:
    """Check the config, claim the run directory (rank zero), train."""
    from sftlab import build
    from sftlab.rundir import guard, write

    run_dir = Path(cfg.paths.output_dir)
    source = build.preflight(cfg, run_dir)
    lock = guard.claim(run_dir, cfg.get("resume"), bool(cfg.get("replace"))) if is_rank_zero() else None
    try:
        if lock is not None:
            write.write_hydra_record(run_dir, cfg)
        return train(cfg, source)
    finally:
        if lock is not None:
            lock.release()


def train(cfg: DictConfig, source: str) -> float:
    import pytorch_lightning as pl

    from sftlab import build
    from sftlab.cli import console
    from sftlab.cli import data as data_cli
    from sftlab.model.adapters import trainable_parameters
    from sftlab.rundir import write
    from sftlab.training import checkpoint, loggers

    started, run_dir = time.time(), Path(cfg.paths.output_dir)
    if cfg.get("compile"):
        # Inductor's FX-graph and AOT-autograd caches are on by default but live in the temp dir, which a
        # reboot or a tmp cleaner empties; in sftlab's cache a later run on this machine reuses the kernels.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cfg.paths.cache_dir) / "inductor"))
    pl.seed_everything(cfg.seed, workers=True)
    parts = build.parts(cfg, source)
    if cfg.data.get("audit") and is_rank_zero():  # rank 0 runs first: failing here, no other rank starts
        data_cli.audit_before_training(cfg, parts, run_dir / "audit")
    datamodule = build.datamodule(parts)
    build.check_validation_interval(cfg, datamodule)
    suite = build.suite(cfg, parts, datamodule.splits, run_dir / "eval")
    # Before the model loads: a resume that cannot be honoured fails in seconds, naming each difference.
    resume_from = checkpoint.resolve_resume(cfg.get("resume"), run_dir)
    settings = checkpoint.run_settings(cfg, datamodule.splits["train"].examples)
    checkpoint.check_resume(resume_from, settings)
    if is_rank_zero():
        console.print_config(cfg)
        write.write_config(run_dir, cfg)

    option = build.adapter(cfg)
    model = build.base_model(parts, option)
    run_loggers = loggers.make_loggers(cfg.get("logger"))
    trainer = build.trainer(cfg, run_loggers)  # first: it knows the device this process trains on
    trainer.callbacks.append(checkpoint.ResumeSettings(settings))  # the run's own record, not a config choice
    evals = {}
    if is_rank_zero() and suite and suite.compare_base:
        evals = suite.run(build.on_eval_device(model, build.eval_device(cfg, trainer)), "base")
    model = option.apply(model, new_token_ids=parts.new_token_ids)
    trainable, total = trainable_parameters(model)
    params = {"trainable": trainable, "total": total}
    log.info("Parameters: %d trainable of %d (%.3f%%)", trainable, total, 100 * trainable / total)
    module = build.module(cfg, model)

    for lg in run_loggers:
        lg.log_hyperparams(
            {**write.resolved_config(cfg), "params": params, "data_counts": datamodule.counts()}
        )
    try:
        # weights_only: a checkpoint is data, never code to unpickle.
        trainer.fit(
            module,
            datamodule=datamodule,
            ckpt_path=resume_from,
            weights_only=True,
        )
        best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
        # Every rank takes part (FSDP and DeepSpeed gather their shards); rank 0 gets the model to save and
        # evaluate, on the eval device.
        tuned = build.tuned_model(cfg, parts, trainer, module, best_path)
        if tuned is None:
            return math.nan  # the other ranks are done: rank 0 saves, evaluates and reports
        log.info("Saved %s", write.save_model(run_dir, tuned, parts.tokenizer, parts.template))
        evals = (suite.run(tuned, "tuned") if suite else {}) or evals
        metrics = write.final_metrics(
            trainer,
            eval=evals,
            data=datamodule.counts(),
            params=params,
            best_checkpoint=best_path,
            runtime_s=round(time.time() - started, 1),
        )
        write.write_json(run_dir / "metrics.json", metrics)
        loggers.log_summary(run_loggers, {"eval": evals, "val/best_loss": metrics["val"]["best_loss"]})
        loggers.log_eval_tables(run_loggers, suite)
    finally:
        sync_hint = loggers.finish(run_loggers)
    if evals:
        console.print_comparison(evals)
    if sync_hint:
        log.info("W&B ran offline. Upload with: %s", sync_hint)
    log.info("Run directory: %s", run_dir)
    return metrics["val"]["best_loss"]


def _record_failed_job(run_dir: Path, cfg: DictConfig) -> None:
    """A sweep job's directory is its own: keep Hydra's record of it (read by sftlab-report) even when the
    job failed before the run directory was claimed."""
    from sftlab.rundir import write

    if not (run_dir / write.HYDRA_RECORD).exists():
        write.write_hydra_record(run_dir, cfg)


def refuse_secret_overrides(main: Callable[..., Any]) -> Callable[..., Any]:
    """A credential typed as an override lands in the shell history, `ps`, Hydra's messages and records:
    refuse it before Hydra sees it, and point to the environment variable the libraries read."""

    @functools.wraps(main)
    def checked(*args: Any, **kwargs: Any) -> Any:
        from sftlab.rundir.redact import secret_override

        keys = [k for k in map(secret_override, sys.argv[1:]) if k]
        if keys:
            sys.exit(
                f"Error: {', '.join(keys)}: a secret on the command line is kept in your shell history and "
                "visible to other users (ps). Set it in the environment instead (HF_TOKEN for the "
                "Hugging Face hub, WANDB_API_KEY or `wandb login` for W&B); sftlab masks such values in "
                "what it writes."
            )
        return main(*args, **kwargs)

    return checked


@refuse_secret_overrides
@plugins.require_for_command_line
@hydra.main(version_base="1.3", config_path=str(paths.config_dir()), config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except Exception as err:
        if sweep.in_sweep():
            # One failing sweep job must not stop the others: logged, error.txt in its dir, NaN returned.
            _record_failed_job(Path(cfg.paths.output_dir), cfg)
            return sweep.record_failure(Path(cfg.paths.output_dir), err)
        if not isinstance(err, SFTLabError):
            raise
        # A problem the user can fix: one message, not a library traceback.
        log.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
