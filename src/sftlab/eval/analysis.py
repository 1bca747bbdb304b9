"""`eval=error_analysis`: what went wrong in the generations, counted, and the worst examples for a human.

Signals, per generation of the eval split (the same generations `generate` scored):
  * repetition: the repeated word n-gram rate (`metrics.repeated_ngram_rate`), and the no-stop rate (the
    output hit `max_new_tokens` without the end-of-turn token: a model that loops or never learned to stop);
  * refusals: a phrase detector ("I'm sorry", "I cannot", "as an AI", ...) run on prompts that are safe to
    answer: the eval split's own prompts (your task data), plus `safe_prompts_path` if given (a JSONL of
    harmless requests in any supported row format), which are generated for this purpose;
  * hallucination proxies: mismatch with the reference (not an exact match and ROUGE-L below
    `mismatch_rouge`), and, when `judge` also ran, the answers the judge flagged for unsupported claims.

Every example gets a badness score (the sum of its flags, plus 1 - ROUGE-L); the `worst_k` worst are written
to `eval/worst_<model>.md` with their reasons.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sftlab.data.quality import REFUSAL_PHRASES, is_refusal, repeated_ngram_rate
from sftlab.eval.base import ANALYSIS, EvalContext

log = logging.getLogger(__name__)


def example_flags(
    rec: dict, *, ngram: int, repetition_threshold: float, mismatch_rouge: float, phrases: list[str]
) -> dict[str, Any]:
    """The error signals of one generation record; `badness` orders the worst-examples list."""
    rep = repeated_ngram_rate(rec["output"], ngram)
    rouge = rec.get("rougeL")
    verdict = rec.get("judge") or {}
    flags = {
        "repetitive": rep > repetition_threshold,
        "no_stop": not rec["stopped"],
        "refusal": is_refusal(rec["output"], phrases),
        "mismatch": not rec["exact_match"] and (rouge is None or rouge < mismatch_rouge),
        "judge_unsupported": verdict.get("unsupported_claims") is True,
    }
    badness = sum(flags.values()) + (1.0 - rouge if rouge is not None else float(not rec["exact_match"]))
    return {**flags, "repeated_ngram_rate": round(rep, 4), "badness": round(badness, 4)}


@dataclass
class ErrorAnalysis:
    """Counts of repetition, refusal and mismatch in the generations; the worst examples to Markdown."""

    ngram: int = 3
    repetition_threshold: float = 0.2
    mismatch_rouge: float = 0.5
    refusal_phrases: list[str] = field(default_factory=lambda: list(REFUSAL_PHRASES))
    safe_prompts_path: str | None = None
    worst_k: int = 10
    compare_base: bool = True
    stage: ClassVar[int] = ANALYSIS

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        records = ctx.records()
        phrases = [p.lower() for p in self.refusal_phrases]
        for rec in records:
            rec["errors"] = example_flags(
                rec,
                ngram=self.ngram,
                mismatch_rouge=self.mismatch_rouge,
                repetition_threshold=self.repetition_threshold,
                phrases=phrases,
            )
        n = len(records)
        rate = lambda key: sum(r["errors"][key] for r in records) / n  # noqa: E731
        judged = [r for r in records if (r.get("judge") or {}).get("unsupported_claims") is not None]
        out = {
            "repeated_ngram_rate": sum(repeated_ngram_rate(r["output"], self.ngram) for r in records) / n,
            "repetitive_rate": rate("repetitive"),
            "no_stop_rate": rate("no_stop"),
            "refusal_rate": rate("refusal"),
            "reference_mismatch_rate": rate("mismatch"),
            "judge_unsupported_rate": (
                sum(r["judge"]["unsupported_claims"] for r in judged) / len(judged) if judged else None
            ),
            "n": n,
        }
        if self.safe_prompts_path:
            out.update(self._safe_prompt_refusals(ctx, phrases))
        wrong = [r for r in records if r["errors"]["badness"] > 0]  # a perfect answer is never "worst"
        worst = sorted(wrong, key=lambda r: -r["errors"]["badness"])[: self.worst_k]
        path = write_worst(Path(ctx.out_dir) / f"worst_{ctx.tag}.md", worst, ctx.tag)
        log.info(
            "Error analysis (%s): %s; the %d worst examples are in %s",
            ctx.tag,
            ", ".join(f"{k}={v:.3f}" for k, v in out.items() if isinstance(v, float)),
            len(worst),
            path,
        )
        return out

    def _safe_prompt_refusals(self, ctx: EvalContext, phrases: list[str]) -> dict[str, Any]:
        from sftlab.data.formats import split_prompt, to_messages
        from sftlab.data.sources import read_jsonl
        from sftlab.model.generate import generate

        rows = read_jsonl(self.safe_prompts_path, key="eval.error_analysis.safe_prompts_path")
        histories = []
        for where, row in rows:
            if isinstance(row, dict) and isinstance(row.get("prompt"), str) and "completion" not in row:
                histories.append([{"role": "user", "content": row["prompt"]}])  # a bare {"prompt": ...} row
            else:
                histories.append(split_prompt(to_messages(row, None, where))[0])
        outs = generate(
            ctx.model,
            ctx.tokenizer,
            ctx.template,
            histories,
            max_new_tokens=ctx.generation.max_new_tokens,
            batch_size=ctx.generation.batch_size,
        )
        refused = [is_refusal(o["text"], phrases) for o in outs]
        return {"safe_prompt_refusal_rate": sum(refused) / len(refused), "safe_prompts": len(refused)}


def write_worst(path: Path, worst: list[dict], tag: str) -> Path:
    """The worst examples as Markdown, most wrong first, with the flags that made them so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Worst {len(worst)} examples of the {tag} model", ""]
    for rank, rec in enumerate(worst, start=1):
        flags = [k for k, v in rec["errors"].items() if v is True]
        lines += [
            f"## {rank}. example {rec['index']}: {', '.join(flags) or 'not an exact match'} "
            f"(badness {rec['errors']['badness']})",
            "",
            f"**Prompt:** {rec['prompt']}",
            "",
            f"**Reference:** {rec['reference']}",
            "",
            f"**Output:** {rec['output']}",
            "",
        ]
        if rec.get("judge", {}).get("reason"):
            lines += [f"**Judge:** {rec['judge']['scores']} {rec['judge']['reason']}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
