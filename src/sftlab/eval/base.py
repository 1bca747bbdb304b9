"""What every evaluator shares: the protocol it implements and the context of one evaluation pass.

Each evaluator module imports only this file, `model/` and `data/`; the suite (suite.py) composes them. An
evaluator's `stage` orders the suite: loss (0), generate (1), judge (2), error_analysis (3), benchmarks (4),
so consumers of generations run after `generate` made them (once per model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from sftlab.data.templates import ChatTemplate
from sftlab.errors import ConfigError

log = logging.getLogger(__name__)

LOSS, GENERATE, JUDGE, ANALYSIS, BENCHMARK = range(5)
READS_GENERATIONS = (GENERATE, JUDGE, ANALYSIS)  # the stages that answer the prompts of a split


class Evaluator(Protocol):
    stage: ClassVar[int]
    compare_base: bool

    def run(self, ctx: EvalContext) -> dict[str, Any]: ...


class RecordMaker(Protocol):
    """What makes the per-example generation records every generation-reading evaluator shares."""

    split: str

    def generate_records(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, rows: Any
    ) -> list[dict]: ...


@dataclass
class EvalContext:
    """What one evaluation pass over one model shares: the model, the data, the generations (made once)."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate
    splits: dict[str, Any]  # split name -> object with `.rows` (conversations) and `.examples` (Encoded)
    tag: str  # "base" or "tuned"
    out_dir: Path
    generation: RecordMaker
    results: dict[str, Any] = field(default_factory=dict)  # earlier evaluators' metrics, by option name
    _records: list[dict] | None = None

    def split(self, name: str) -> Any:
        if name not in self.splits:
            raise ConfigError(
                f"eval: split {name!r} is not loaded (have {sorted(self.splits)}); set "
                f"data.{name}_path or choose another eval.<option>.split."
            )
        return self.splits[name]

    def records(self) -> list[dict]:
        """Per-example generation records of the generation split, generated on first use."""
        if self._records is None:
            log.info("Generating on the %s split with the %s model", self.generation.split, self.tag)
            self._records = self.generation.generate_records(
                self.model, self.tokenizer, self.template, self.split(self.generation.split).rows
            )
        return self._records
