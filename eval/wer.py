"""Word error rate, computed by jiwer (the well-kept implementation of the Levenshtein alignment).

``WER = (S + D + I) / N``: substitutions, deletions and insertions of the minimum-edit alignment
of each hypothesis to its reference, summed over the corpus, over the N reference words. It can
exceed 1 (many insertions). Both sides are normalised the same way first: lower case, every
character other than a letter, digit, apostrophe or space dropped, runs of spaces collapsed.
"""

from __future__ import annotations

import re

import jiwer

_DROP = re.compile(r"[^a-z0-9' ]+")


def normalise(text: str) -> str:
    """'A Red circle, left!' -> 'a red circle left'."""
    return " ".join(_DROP.sub(" ", text.lower()).split())


def word_error_rate(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus WER of ``hypotheses`` against ``references`` (one each, same order) ->
    {"wer", "substitutions", "deletions", "insertions", "hits", "n_words", "sentence_error_rate"}.
    An empty hypothesis counts as deleting every word of its reference."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalise(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("a reference transcript is empty after normalisation")
    hyps = [normalise(h) for h in hypotheses]
    out = jiwer.process_words(refs, hyps)
    n = out.hits + out.substitutions + out.deletions
    return {"wer": float(out.wer), "substitutions": out.substitutions, "deletions": out.deletions,
            "insertions": out.insertions, "hits": out.hits, "n_words": n,
            "sentence_error_rate": sum(r != h for r, h in zip(refs, hyps)) / len(refs)}
