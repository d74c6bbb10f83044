"""Rank statistics in the standard library only (imported by the start-up-fast `dreamprm-clean`)."""
from __future__ import annotations

from typing import Sequence


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, tied values sharing their mean rank.

    >>> average_ranks([0.5, 0.1, 0.5])
    [2.5, 1.0, 2.5]
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the chance that a right item outscores a wrong one (ties count a
    half; Mann-Whitney's rank sum, O(n log n)). None when one of the classes is empty.

    >>> auc([0.9, 0.4, 0.4, 0.1], [True, True, False, False])
    0.875
    """
    n_right = sum(bool(y) for y in labels)
    n_wrong = len(labels) - n_right
    if not n_right or not n_wrong:
        return None
    right_ranks = sum(r for r, y in zip(average_ranks(scores), labels) if y)
    return (right_ranks - n_right * (n_right + 1) / 2) / (n_right * n_wrong)
