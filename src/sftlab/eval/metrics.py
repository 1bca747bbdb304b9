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


def _rouge_l(preds: list[str], refs: list[str]) -> float:
    return float(rouge_score(preds, refs, rouge_keys="rougeL", use_stemmer=False)["rougeL_fmeasure"])


def text_metrics(
    preds: Sequence[str], refs: Sequence[str], names: Sequence[str] = TEXT_METRICS
) -> tuple[dict, list[dict]]:
    """(corpus-level scores, the same scores per example to rank the worst examples). Corpus: ROUGE-L is the
    mean over examples, BLEU and chrF pool n-gram counts. Per example: no BLEU (per sentence it is noise).
    chrF's corpus and sentence scores come from one torchmetrics call: it takes about 5 ms per sentence, so
    a second pass would double the cost."""
    _check(names)
    preds, refs = list(preds), list(refs)
    corpus: dict = {}
    per_example: list[dict] = [{} for _ in preds]
    for name in names:
        if name == "bleu":
            corpus[name] = float(bleu_score(preds, [[r] for r in refs]))
            continue
        if name == "chrf":
            score, sentences = chrf_score(
                preds, [[r] for r in refs], n_word_order=0, return_sentence_level_score=True
            )
            corpus[name], values = float(score), sentences.tolist()
        else:  # rougeL
            corpus[name] = _rouge_l(preds, refs)
            values = [_rouge_l([p], [r]) for p, r in zip(preds, refs, strict=True)]
        for row, value in zip(per_example, values, strict=True):
            row[name] = round(value, 4)
    return corpus, per_example
