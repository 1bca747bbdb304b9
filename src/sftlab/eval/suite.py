"""The `eval` config group as a suite: build the chosen evaluators, run them on a model, write the results.

`eval` is a list-valued group: `eval=generate` (default), `eval=[generate,judge,error_analysis]`, `eval=none`.
Each option file nests its settings under its own name (`eval.generate.max_new_tokens=64`), so several can be
chosen at once. Plain values set directly under `eval` (`+eval.max_examples=20`, or an experiment's
`eval: {max_examples: 4}`) apply to every chosen evaluator that has that field.

Evaluators run in a fixed order (their `stage`, eval/base.py) whatever the order on the command line: loss,
generate, judge, error_analysis, benchmarks, so `judge` and `error_analysis` read the generations `generate`
made (one generation pass per model) and error analysis can use the judge's flags. Each is run on the base
model (before the adapter is applied) and on the tuned model, unless its `compare_base` is false.

Results: `eval/results.json` ({"base": {...}, "tuned": {...}, "delta": {...}}), `eval/generations.jsonl`
(one row per example and model, with every per-example score; also split per model as
`generations_base.jsonl` and `generations_tuned.jsonl`), the metrics dict returned for metrics.json
(generate's metrics unprefixed, e.g. `exact_match`; the others as `<option>/<metric>`), and W&B tables.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from sftlab.data.templates import ChatTemplate
from sftlab.errors import ConfigError
from sftlab.eval.base import JUDGE, READS_GENERATIONS, EvalContext, Evaluator
from sftlab.eval.benchmarks import BenchmarkEval, forgetting
from sftlab.eval.generate import GenerationEval
from sftlab.rundir.write import write_json

log = logging.getLogger(__name__)


def build_evaluators(cfg_eval: DictConfig | None) -> dict[str, Evaluator]:
    """Instantiate every chosen option, apply the shared plain values, and order them by stage."""
    if not cfg_eval:
        return {}
    shared = {k: v for k, v in cfg_eval.items() if not isinstance(v, DictConfig)}
    evaluators = {}
    for name, node in cfg_eval.items():
        if isinstance(node, DictConfig):
            evaluators[name] = instantiate(node, _convert_="all")
    if (
        not evaluators
    ):  # eval=none: shared values (e.g. an experiment's eval.max_examples) have nothing to set
        return {}
    used = set()
    for name, ev in evaluators.items():
        fields = {f.name for f in dataclasses.fields(ev)}
        overrides = {
            k: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v
            for k, v in shared.items()
            if k in fields
        }
        used |= set(overrides)
        evaluators[name] = dataclasses.replace(ev, **overrides)
    unused = sorted(set(shared) - used)
    if unused:
        chosen = ", ".join(evaluators) or "none"
        raise ConfigError(
            f"eval.{unused[0]}: no chosen evaluator ({chosen}) has this setting. "
            f"Set it per option, e.g. eval.<option>.{unused[0]}=..."
        )
    order = sorted(evaluators, key=lambda n: (evaluators[n].stage, n))
    return {n: evaluators[n] for n in order}


class EvalSuite:
    """Runs the chosen evaluators on the base and the tuned model and keeps the results side by side."""

    def __init__(
        self,
        evaluators: dict[str, Evaluator],
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate,
        splits: dict[str, Any],
        out_dir: Path,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.evaluators, self.tokenizer, self.template = evaluators, tokenizer, template
        self.splits, self.out_dir, self.autocast = splits, Path(out_dir), autocast
        gen = [e for e in evaluators.values() if isinstance(e, GenerationEval)]
        self.generation = gen[0] if gen else self._default_generation(evaluators)
        self.results: dict[str, dict[str, Any]] = {}
        self.records: dict[str, list[dict]] = {}
        self._check_prompts()

    def _check_prompts(self) -> None:
        """Generation answers each row's prompt; plain-text documents (data.format=text) have none. Said here,
        before the base model is evaluated, not after training."""
        generating = [n for n, e in self.evaluators.items() if e.stage in READS_GENERATIONS]
        split = self.splits.get(self.generation.split)
        if generating and split is not None and any(isinstance(row, str) for row in split.rows):
            raise ConfigError(
                f"eval={','.join(generating)} answers the prompts of the {self.generation.split!r} split, "
                "but its rows are plain-text documents (data.format=text) with no prompt to answer. Choose "
                "eval=loss (loss and perplexity on the val split), eval=benchmarks or eval=none."
            )

    @staticmethod
    def _default_generation(evaluators: dict[str, Evaluator]) -> GenerationEval:
        """Without `generate` chosen, judge/error_analysis still need generations: default settings, limited
        to the judge's `max_examples` when a judge is chosen (nothing else would read more)."""
        only_judge = all(e.stage not in READS_GENERATIONS or e.stage == JUDGE for e in evaluators.values())
        limits = [e.max_examples for e in evaluators.values() if e.stage == JUDGE]
        return GenerationEval(max_examples=limits[0] if only_judge and limits else None)

    @property
    def compare_base(self) -> bool:
        return any(getattr(e, "compare_base", True) for e in self.evaluators.values())

    def run(self, model: torch.nn.Module, tag: str) -> dict[str, dict[str, Any]]:
        """Evaluate `model` as `tag` ("base"/"tuned"); returns all results so far, written to eval/."""
        ctx = EvalContext(
            model, self.tokenizer, self.template, self.splits, tag, self.out_dir, self.generation
        )
        flat: dict[str, Any] = {}
        device = next(model.parameters()).device.type
        with torch.autocast(device, dtype=self.autocast, enabled=self.autocast is not None):
            for name, ev in self.evaluators.items():
                if tag == "base" and not getattr(ev, "compare_base", True):
                    continue
                log.info("Evaluating the %s model: %s", tag, name)
                out = ev.run(ctx)
                ctx.results[name] = out
                flat.update(
                    out if isinstance(ev, GenerationEval) else {f"{name}/{k}": v for k, v in out.items()}
                )
        self.results[tag] = flat
        if ctx._records is not None:
            self.records[tag] = ctx._records
        if tag == "tuned" and "base" in self.results:
            self._report_forgetting()
        self.write()
        return {k: v for k, v in self.results.items() if k in ("base", "tuned")}

    def forgetting(self) -> dict[str, float]:
        """Benchmark metrics that dropped from base to tuned (see eval/benchmarks.py)."""
        names = [n for n, e in self.evaluators.items() if isinstance(e, BenchmarkEval)]
        if not names or not {"base", "tuned"} <= set(self.results):
            return {}
        return forgetting(self.results["base"], self.results["tuned"], names)

    def _report_forgetting(self) -> None:
        for key, change in self.forgetting().items():
            log.warning(
                "Forgetting: %s dropped by %.3f (base %.3f -> tuned %.3f)",
                key,
                -change,
                self.results["base"][key],
                self.results["tuned"][key],
            )

    def deltas(self) -> dict[str, float]:
        base, tuned = self.results.get("base", {}), self.results.get("tuned", {})
        return {
            k: round(tuned[k] - base[k], 6)
            for k in tuned
            if k in base and isinstance(tuned[k], float) and isinstance(base[k], float)
        }

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            self.out_dir / "results.json",
            {**self.results, "delta": self.deltas(), "forgetting": self.forgetting()},
        )
        rows = {
            tag: [json.dumps({"model": tag, **rec}, ensure_ascii=False, default=str) for rec in records]
            for tag, records in self.records.items()
        }
        (self.out_dir / "generations.jsonl").write_text(
            "".join(r + "\n" for rs in rows.values() for r in rs), encoding="utf-8"
        )
        for tag, lines in rows.items():  # one file per model too, for reading (or diffing) one side alone
            (self.out_dir / f"generations_{tag}.jsonl").write_text(
                "".join(r + "\n" for r in lines), encoding="utf-8"
            )

    def log_to_wandb(self, run: Any) -> None:
        """Generations and the comparison as W&B tables on an open run (`wandb.Run`), if any."""
        if run is None:
            return
        import wandb

        cols = ["model", "index", "prompt", "reference", "output", "exact_match", "stopped"]
        extra = sorted({k for recs in self.records.values() for r in recs for k in r} - {*cols, "history"})
        rows = [
            [tag, *(r.get(c) for c in cols[1:]), *(_cell(r.get(c)) for c in extra)]
            for tag, recs in self.records.items()
            for r in recs
        ]
        comparison = [
            [k, _cell(self.results.get("base", {}).get(k)), _cell(v), self.deltas().get(k)]
            for k, v in self.results.get("tuned", {}).items()
        ]
        run.log(
            {
                "eval/generations": wandb.Table(columns=cols + extra, data=rows),
                "eval/comparison": wandb.Table(columns=["metric", "base", "tuned", "delta"], data=comparison),
            }
        )


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value


def build_suite(
    cfg_eval: DictConfig | None,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    splits: dict[str, Any],
    out_dir: Path,
    autocast: torch.dtype | None = None,
) -> EvalSuite | None:
    evaluators = build_evaluators(cfg_eval)
    return EvalSuite(evaluators, tokenizer, template, splits, out_dir, autocast) if evaluators else None
