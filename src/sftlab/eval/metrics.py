"""Text metrics for generations, pure functions over strings.

ROUGE-L, BLEU and chrF come from torchmetrics. ROUGE-L is computed without a stemmer (the stemmer and
ROUGE-Lsum need nltk and its downloaded `punkt` data, which an offline machine lacks). chrF is the plain
character n-gram F-score (`n_word_order=0`, as sacrebleu's chrF); BLEU is 4-gram corpus BLEU, which is 0 for
outputs shorter than four words (one-word answers: read exact match and chrF instead).
"""

from __future__ import annotations

from collections.abc import Sequence

from torchmetrics.functional.text import bleu_score, chrf_score, rouge_score

# A text metric the data audit uses too, so it lives in the data layer.
from sftlab.data.quality import repeated_ngram_rate as repeated_ngram_rate

TEXT_METRICS = ("rougeL", "bleu", "chrf")


def _check(names: Sequence[str]) -> None:
    unknown = sorted(set(names) - set(TEXT_METRICS))
    if unknown:
        from sftlab.errors import ConfigError

        raise ConfigError(f"eval.generate.text_metrics: unknown {unknown}; choose from {list(TEXT_METRICS)}.")


def _one(name: str, preds: list[str], refs: list[str]) -> float:
    if name == "rougeL":
        return float(rouge_score(preds, refs, rouge_keys="rougeL", use_stemmer=False)["rougeL_fmeasure"])
    if name == "bleu":
        return float(bleu_score(preds, [[r] for r in refs]))
    return float(chrf_score(preds, [[r] for r in refs], n_word_order=0))


def corpus_text_metrics(
    preds: Sequence[str], refs: Sequence[str], names: Sequence[str] = TEXT_METRICS
) -> dict:
    """Corpus-level scores (ROUGE-L is the mean over examples, BLEU and chrF pool n-gram counts)."""
    _check(names)
    return {name: _one(name, list(preds), list(refs)) for name in names}


def per_example_text_metrics(
    preds: Sequence[str], refs: Sequence[str], names: Sequence[str] = TEXT_METRICS
) -> list[dict]:
    """The same scores per example, to rank the worst examples (no BLEU: per sentence it is noise)."""
    _check(names)
    keep = [n for n in names if n != "bleu"]
    return [{name: round(_one(name, [p], [r]), 4) for name in keep} for p, r in zip(preds, refs, strict=True)]
