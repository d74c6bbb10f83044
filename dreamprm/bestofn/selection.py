"""Selection: step scores -> chain scores (the training aggregation) -> the best chain of each
question; majority vote over final answers, the baseline the evaluation compares with."""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import torch

from dreamprm.bestofn.candidates import Question, normalize_answer
from dreamprm.bilevel.aggregation import aggregate


def chain_scores(step_logits: Sequence[Sequence[float]], aggregation: str) -> list[float]:
    """Chain probabilities of one question's candidates, with the training aggregation (in float64)."""
    flat = torch.tensor([x for chain in step_logits for x in chain], dtype=torch.float64)
    index = torch.tensor([c for c, chain in enumerate(step_logits) for _ in chain], dtype=torch.long)
    return aggregate(aggregation, flat, index, len(step_logits)).tolist()


def best_index(scores: Sequence[float], among: Sequence[int] | None = None) -> int:
    """The highest-scored candidate (of `among`, default all); ties go to the lowest index, NaN ranks last."""
    among = range(len(scores)) if among is None else among
    return min(among, key=lambda i: (-scores[i] if not math.isnan(scores[i]) else math.inf, i))


def majority_vote(answers: Sequence[str | None], among: Sequence[int] | None = None) -> int | None:
    """Self-consistency: a candidate holding the most common normalised final answer.

    Chains without a final answer do not vote. Ties between answers go to the answer whose first
    chain comes first in candidate order, and that first chain is returned. None when no chain has
    an answer.

    >>> majority_vote(["2", "3", "3.0", "2", None])
    0
    """
    among = range(len(answers)) if among is None else among
    votes: Counter[str] = Counter()
    first: dict[str, int] = {}
    for i in among:
        if answers[i] is not None:
            key = normalize_answer(answers[i])
            votes[key] += 1
            first.setdefault(key, i)
    if not votes:
        return None
    return min(first.values(), key=lambda i: (-votes[normalize_answer(answers[i])], i))


def select(questions: Sequence[Question], step_logits: Sequence[Sequence[Sequence[float]]],
           aggregation: str) -> list[dict[str, Any]]:
    """Per question: the best chain, and the step and chain scores (probabilities) of every chain."""
    out = []
    for q, logits in zip(questions, step_logits):
        scores = chain_scores(logits, aggregation)
        best = best_index(scores)
        chosen = q.candidates[best]
        out.append({
            "id": q.qid, "best_index": best, "best_score": scores[best], "best_answer": chosen.answer,
            "best_correct": chosen.correct, "best_text": chosen.text, "chain_scores": scores,
            "step_scores": [torch.sigmoid(torch.tensor(chain, dtype=torch.float64)).tolist() for chain in logits],
            "final_answers": [c.answer for c in q.candidates], "correct": [c.correct for c in q.candidates],
        })
    return out
