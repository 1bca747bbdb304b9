"""`eval=benchmarks` (and `eval=mmlu`, `eval=truthfulqa`): lm-evaluation-harness on the model in memory, for
catastrophic-forgetting checks: the same tasks on the base and on the tuned model (base + adapter).

The model is handed to lm-eval as an object (`HFLM(pretrained=model)`), so the tuned model is exactly the one
just trained, LoRA layers included, with no reload or merge. Task names are lm-eval's (`mmlu`,
`truthfulqa_mc2`, `hellaswag`, ...: they download their data from the Hugging Face Hub, so they need network);
`sftlab_mc` is the small multiple-choice task shipped in sftlab/resources/benchmarks, which runs offline.
Your own task YAMLs: `include_path=<dir>`.

Metrics come back as `<option>/<task>/<metric>` (e.g. `benchmarks/sftlab_mc/acc`); the suite lists every
benchmark metric that dropped from base to tuned under "forgetting" in results.json and in the log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml

from sftlab.errors import ConfigError, SFTLabError
from sftlab.eval.base import BENCHMARK, EvalContext
from sftlab.model.forward import unwrap

log = logging.getLogger(__name__)
BUNDLED_DIR = Path(str(resources.files("sftlab") / "resources" / "benchmarks"))


def bundled_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob("*.yaml"))}


def task_config(name: str) -> str | dict:
    """A bundled task as an lm-eval config dict with its data file made absolute; other names pass through."""
    path = bundled_tasks().get(name)
    if path is None:
        return name
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"]["data_files"] = {split: str(path.parent / f) for split, f in files.items()}
    return cfg


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's {"task": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "..."}} -> {"task/acc": 0.5}."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "sample_len":
                out[f"{task}/{key.split(',')[0]}"] = float(value)
    return out


@dataclass
class BenchmarkEval:
    """lm-evaluation-harness tasks on the base and the tuned model."""

    tasks: list[str] = field(default_factory=lambda: ["sftlab_mc"])
    num_fewshot: int | None = None
    limit: int | float | None = None  # examples per task (or a fraction): quick looks at big suites
    batch_size: int = 8
    include_path: str | None = None  # a directory of your own lm-eval task YAMLs
    compare_base: bool = True
    stage: ClassVar[int] = BENCHMARK

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("eval.benchmarks.tasks: name at least one lm-eval task, e.g. [sftlab_mc].")

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        try:
            from lm_eval import simple_evaluate
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise SFTLabError(
                "eval=benchmarks needs lm-evaluation-harness: pip install 'sftlab[bench]' "
                "(`make install` includes it)."
            ) from None
        manager = TaskManager(include_path=self.include_path) if self.include_path else TaskManager()
        lm = HFLM(pretrained=unwrap(ctx.model), tokenizer=ctx.tokenizer, batch_size=self.batch_size)
        log.info("lm-eval on the %s model: %s", ctx.tag, ", ".join(self.tasks))
        was_training = ctx.model.training
        try:
            out = simple_evaluate(
                model=lm,
                tasks=[task_config(t) for t in self.tasks],
                num_fewshot=self.num_fewshot,
                limit=self.limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=1000,
            )
        finally:
            ctx.model.train(was_training)
        if out is None:
            raise SFTLabError(f"eval: lm-eval returned no results for {self.tasks}.")
        return flatten_results(out["results"])


def forgetting(base: dict[str, Any], tuned: dict[str, Any], prefixes: list[str]) -> dict[str, float]:
    """Benchmark scores that went down from base to tuned (stderr entries excluded): {metric: change}."""
    drops = {}
    for key, value in tuned.items():
        mine = any(key.startswith(p + "/") for p in prefixes) and "stderr" not in key
        if mine and isinstance(value, float) and isinstance(base.get(key), float) and value < base[key]:
            drops[key] = round(value - base[key], 6)
    return drops
