"""ROUGE-1/2/L/Lsum F-measures (rouge-score, Porter stemming), averaged over samples, in points (x100)."""

from __future__ import annotations

from typing import Dict, Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> Dict[str, float]:
    """Mean F-measure of each ROUGE type over the pairs, x100. rougeLsum splits texts at newlines."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, at least one: got {len(predictions)} "
                         f"and {len(references)}")
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ModuleNotFoundError(f"ROUGE needs the rouge-score package: pip install rouge-score "
                                  f"(or `pip install llmapi[eval]`): {e}") from e
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        for t in ROUGE_TYPES:
            totals[t] += scores[t].fmeasure
    return {t: 100.0 * v / len(predictions) for t, v in totals.items()}
