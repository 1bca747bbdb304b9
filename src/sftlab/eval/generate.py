"""The `generate` evaluator: greedy generations on held-out conversations (exact match, ROUGE-L, BLEU, chrF).

Generation itself is model/generate.py, the loop chat, serve and the sample callback share. The fraction of
generations that ran into `max_new_tokens` without stopping is reported: it flags a model that never learned
to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from sftlab.data.formats import split_prompt
from sftlab.data.reasoning import REASONING_KEY, split_reasoning
from sftlab.data.templates import ChatTemplate
from sftlab.eval import metrics
from sftlab.eval.base import GENERATE, EvalContext
from sftlab.model.generate import generate

REASONING_OUTPUT = ("strip", "show")


def normalize(text: str) -> str:
    return " ".join(text.strip().split()).lower()


def make_record(index: int, history: list[dict], reference: str, out: dict, reasoning: str = "strip") -> dict:
    """One generation record; `out` is one result of `model.generate.generate` (text, stopped, new_tokens)."""
    thought, answer = split_reasoning(out["text"])
    return {
        "index": index,
        "prompt": history[-1]["content"],
        "history": history,
        "reference": reference,
        "output": answer if reasoning == "strip" else out["text"],
        "answer": answer,
        "reasoning": thought,
        "stopped": out["stopped"],
        "new_tokens": out["new_tokens"],
        "exact_match": normalize(answer) == normalize(reference),
    }


def _answer_text(conversation: Sequence[dict]) -> str:
    """What a model is expected to generate for the last assistant turn: its reasoning (kept out of `content`
    by the readers) and its content."""
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    message = conversation[last]
    return (
        f"<think>\n{message[REASONING_KEY]}\n</think>\n\n{message['content']}"
        if message.get(REASONING_KEY)
        else message["content"]
    )


@dataclass
class GenerationEval:
    """`eval=generate`: greedy generations on a split, scored against the references.

    Metrics: exact match of the final answer (after whitespace/case normalization; a `<think>` block is not
    part of the answer), ROUGE-L F1, BLEU and chrF (torchmetrics; the
    ROUGE variant needs no nltk), the no-stop rate (hit `max_new_tokens`) and mean generated tokens.
    Its settings (split, max_examples, max_new_tokens, new_tokens_margin, batch_size) also drive the
    generations that `judge` and `error_analysis` read, so every evaluator looks at the same outputs.
    """

    split: str = "test"
    # None: the longest reference in tokens (with its reasoning, when the data has some), plus its end-of-turn
    # token, plus `new_tokens_margin`. A model still talking that far past every reference is not an exact
    # match, and every token decoded after that is time spent on an answer already wrong (a base model that
    # never stops decodes to the limit). A model that reasons where the data has no reasoning needs a number.
    max_new_tokens: int | None = None
    new_tokens_margin: int = 8
    # Rows decoded together. Each decoding step reads every weight once whatever the rows, so on a CPU a
    # large batch is nearly free per row (the 100 test questions of the default run in two batches).
    batch_size: int = 64
    max_examples: int | None = None
    compare_base: bool = True
    stage: ClassVar[int] = GENERATE
    text_metrics: tuple[str, ...] = ("rougeL", "bleu", "chrf")
    # A reasoning model's output is `<think>…</think>answer`. Exact match and the text metrics always score
    # the final answer (the reference is the answer: readers move reasoning out of `content`). `strip`: the
    # record's `output` (what judge, error analysis and reports read) is the answer; `show`: the whole text.
    # The reasoning is kept in the record's `reasoning` either way.
    reasoning: str = "strip"

    def __post_init__(self) -> None:
        if self.reasoning not in REASONING_OUTPUT:
            from sftlab.errors import ConfigError

            raise ConfigError(
                f"eval.generate.reasoning={self.reasoning!r}: use strip (outputs are final answers) or show."
            )

    def generate_records(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate,
        conversations: Sequence[Sequence[dict]],
    ) -> list[dict]:
        """One record per example (make_record): prompt, reference, output, answer, reasoning, stopped,
        new_tokens, exact_match."""
        convs = list(conversations)[: self.max_examples]
        histories, references = zip(*(split_prompt(c) for c in convs), strict=True)
        outs = generate(
            model,
            tokenizer,
            template,
            histories,
            max_new_tokens=self.new_tokens_for([_answer_text(c) for c in convs], tokenizer),
            batch_size=self.batch_size,
        )
        return [
            make_record(i, h, r, o, self.reasoning)
            for i, (h, r, o) in enumerate(zip(histories, references, outs, strict=True))
        ]

    def new_tokens_for(self, answers: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> int:
        """`max_new_tokens`, or the longest answer's tokens + 1 (its end-of-turn) + the margin."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"] if answers else []
        return max(map(len, ids), default=0) + 1 + self.new_tokens_margin

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        records = ctx.records()
        # Records written before reasoning was split out have no "answer": their output is the answer.
        preds = [r.get("answer", r["output"]) for r in records]
        refs = [r["reference"] for r in records]
        corpus, per_example = metrics.text_metrics(preds, refs, self.text_metrics)
        for rec, scores in zip(records, per_example, strict=True):
            rec.update(scores)
        n = len(records)
        return {
            "exact_match": sum(r["exact_match"] for r in records) / n,
            **corpus,
            "no_stop_rate": sum(not r["stopped"] for r in records) / n,
            "mean_new_tokens": sum(r["new_tokens"] for r in records) / n,
            "n": n,
        }
