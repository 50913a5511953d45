"""Agreement between annotators who answered the same yes/no questions (a grading instrument).

- :func:`percent_agreement`: the share of items on which two annotators give the same answer.
- :func:`cohen_kappa`: Cohen's kappa (Cohen 1960) for two annotators.
- :func:`fleiss_kappa`: Fleiss' kappa (Fleiss 1971) for any number m >= 2 of annotators.
- :func:`agreement`: what the human gate reports: for two annotators Cohen's kappa, for three or
  more Fleiss' kappa, and always the mean pairwise percent agreement.

Kappa is 1 for perfect agreement, 0 for the agreement expected by chance from the answer rates,
negative below chance; it is None (undefined, 0/0) when chance agreement is already 1, i.e.
every annotator gave the same single answer to every item.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

Answers = Sequence[bool]


def _check(raters: Sequence[Answers]) -> int:
    if len(raters) < 2:
        raise ValueError(f"agreement needs at least two annotators, got {len(raters)}")
    n = len(raters[0])
    if n == 0 or any(len(r) != n for r in raters):
        raise ValueError(f"annotators answered different numbers of items: {[len(r) for r in raters]}")
    return n


def percent_agreement(a: Answers, b: Answers) -> float:
    """Observed agreement ``p_o``: the share of items with the same answer."""
    n = _check([a, b])
    return sum(bool(x) == bool(y) for x, y in zip(a, b)) / n


def cohen_kappa(a: Answers, b: Answers) -> float | None:
    """Cohen's kappa of two annotators' yes/no answers (Cohen 1960).

    ``kappa = (p_o - p_e) / (1 - p_e)`` with ``p_o`` the observed agreement and
    ``p_e = p_a p_b + (1 - p_a)(1 - p_b)`` the chance agreement from each one's yes rate ``p``.
    None when ``p_e = 1`` (both answered everything with the same single answer)."""
    n = _check([a, b])
    p_o = percent_agreement(a, b)
    pa, pb = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    p_e = pa * pb + (1 - pa) * (1 - pb)
    return None if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(raters: Sequence[Answers]) -> float | None:
    """Fleiss' kappa of m >= 2 annotators' yes/no answers to the same N items (Fleiss 1971).

    With ``n_ij`` the number of annotators giving item i answer j (j in {yes, no}):
    ``P_i = (sum_j n_ij^2 - m) / (m (m - 1))`` (the agreeing pairs on item i),
    ``P_bar = mean_i P_i``, ``p_j = sum_i n_ij / (N m)``, ``P_e = sum_j p_j^2``,
    ``kappa = (P_bar - P_e) / (1 - P_e)``. None when ``P_e = 1``."""
    n = _check(raters)
    m = len(raters)
    yes = [sum(bool(r[i]) for r in raters) for i in range(n)]
    p_bar = sum((y * y + (m - y) * (m - y) - m) / (m * (m - 1)) for y in yes) / n
    p_yes = sum(yes) / (n * m)
    p_e = p_yes ** 2 + (1 - p_yes) ** 2
    return None if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def agreement(raters: Sequence[Answers]) -> dict:
    """``{"n_annotators", "statistic", "kappa", "mean_pairwise_agreement"}`` for m >= 2
    annotators: ``statistic`` is "cohen_kappa" for two and "fleiss_kappa" for more."""
    pairs = list(combinations(raters, 2))
    two = len(raters) == 2
    return {"n_annotators": len(raters), "statistic": "cohen_kappa" if two else "fleiss_kappa",
            "kappa": cohen_kappa(*raters) if two else fleiss_kappa(raters),
            "mean_pairwise_agreement": sum(percent_agreement(a, b) for a, b in pairs) / len(pairs)}
