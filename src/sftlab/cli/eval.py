"""`sftlab-eval run=<run dir> eval=[generate,judge]`: evaluate a finished run, base vs tuned.

A Hydra app on conf/eval_run.yaml, so the `eval` group composes exactly as in `python train.py`
(`eval=[generate,error_analysis] eval.generate.max_new_tokens=64`). The model, tokenizer, template and data
come from the run (`sftlab.build.load_run`); `test_path=` evaluates another JSONL file. The base model is
the same loaded model with its adapter disabled (peft's `disable_adapter`), so nothing is loaded twice; a full
fine-tuning run loads its configured base separately. Results: <run>/eval/results.json, generations.jsonl,
worst_<model>.md (error analysis), a printed table, and W&B tables with `wandb=true`. Each evaluation writes
into a folder of its own, `<run>/evals/<date>_<time>/` (or `out_dir`), never over the training-time
`<run>/eval/`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from peft import PeftModel

from sftlab import build, paths
from sftlab.build import LoadedRun, load_run
from sftlab.cli import console
from sftlab.errors import SFTLabError
from sftlab.eval.suite import EvalSuite
from sftlab.training import loggers

log = logging.getLogger("sftlab.eval")


def load_splits(run: LoadedRun, test_path: str | None) -> dict[str, Any]:
    """The run's data splits, tokenized with the run's tokenizer and template (test_path overrides)."""
    overrides = {"test_path": test_path} if test_path else {}
    return build.datamodule(run, stage="test", **overrides).splits


def evaluate_base(suite: EvalSuite, run: LoadedRun, device: torch.device | None = None) -> None:
    if isinstance(run.model, PeftModel):
        with run.model.disable_adapter():  # the base model of the run, without a second load
            suite.run(run.model, "base")
        return
    base = load_run(run.run_dir, with_adapter=False)
    suite.run(build.on_eval_device(base.model, device) if device else base.model, "base")
    del base


def results_dir(run_dir: Path, out_dir: str | None) -> Path:
    """Where this evaluation writes: `out_dir`, else a folder of its own, `<run>/evals/<date>_<time>` (Hydra's
    job directory for this command), so the training-time `<run>/eval/` that metrics.json summarizes is never
    replaced. A folder that already holds results is refused, never overwritten."""
    if out_dir:
        out = Path(out_dir)
    elif HydraConfig.initialized():
        out = Path(HydraConfig.get().runtime.output_dir)
    else:
        out = run_dir / "evals" / time.strftime("%Y-%m-%d_%H-%M-%S")
    if (out / "results.json").exists():
        raise SFTLabError(
            f"out_dir={str(out)!r} already holds evaluation results (results.json); sftlab-eval does not "
            "overwrite them. Pass another out_dir (or leave it unset: each evaluation gets "
            "<run>/evals/<time>)."
        )
    return out


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    out_dir = results_dir(Path(cfg.run), cfg.get("out_dir"))
    run = load_run(cfg.run, with_adapter=True)
    device = build.device_for(cfg.get("eval_device"))
    build.on_eval_device(run.model, device)  # loaded on the CPU; a GPU run is evaluated on the GPU
    splits = load_splits(run, cfg.test_path)
    suite = build.suite(cfg, run, splits, out_dir)
    if suite is None:
        raise SFTLabError("sftlab-eval: eval=none leaves nothing to run; choose e.g. eval=[generate].")
    if cfg.compare_base and suite.compare_base:
        evaluate_base(suite, run, device)
    evals = suite.run(run.model, "tuned")
    console.print_comparison(evals)
    if cfg.wandb:
        _log_wandb(suite, run, out_dir)
    log.info("Results in %s", out_dir)
    return evals


def _log_wandb(suite: EvalSuite, run: LoadedRun, out_dir: Path) -> None:
    import wandb

    if not os.environ.get("WANDB_MODE") and not loggers.wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    # A wandb Run is its own context manager (finish on exit); it has no close() for contextlib.closing.
    with wandb.init(
        project="sftlab", job_type="eval", dir=str(out_dir), name=f"eval-{run.run_dir.name}"
    ) as wb:
        wb.summary.update({"eval": dict(suite.results)})
        suite.log_to_wandb(wb)


@hydra.main(version_base="1.3", config_path=str(paths.config_dir()), config_name="eval_run")
def main(cfg: DictConfig) -> None:
    try:
        run_eval(cfg)
    except SFTLabError as err:
        log.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
