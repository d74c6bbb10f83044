"""Evaluation against labels or ground truth: PRM selection, majority vote, a random pick and the
oracle for N = 1, 2, 4, ..., N (smaller N: seeded subsets of each question's candidates)."""
from __future__ import annotations

import itertools
import math
import random
from typing import Any, Sequence

from dreamprm.bestofn.candidates import Question, normalize_answer
from dreamprm.bestofn.selection import best_index, majority_vote


def subset_sizes(n_max: int) -> list[int]:
    """1, 2, 4, ... below n_max, then n_max."""
    return [2 ** k for k in range(n_max.bit_length()) if 2 ** k < n_max] + [n_max]


def candidate_subsets(n_max: int, n: int, *, subsamples: int, rng: random.Random) -> list[tuple[int, ...]]:
    """Every n-subset when there are at most `subsamples` of them, else `subsamples` random ones."""
    if math.comb(n_max, n) <= subsamples:
        return list(itertools.combinations(range(n_max), n))
    return [tuple(sorted(rng.sample(range(n_max), n))) for _ in range(subsamples)]


def _outcome(q: Question, scores: Sequence[float], among: Sequence[int]) -> dict[str, float]:
    correct = [bool(q.candidates[i].correct) for i in among]
    vote = majority_vote([c.answer for c in q.candidates], among)
    return {"prm": float(q.candidates[best_index(scores, among)].correct),
            "majority": float(vote is not None and bool(q.candidates[vote].correct)),
            "random": sum(correct) / len(correct), "oracle": float(any(correct))}


def evaluate(questions: Sequence[Question], selections: Sequence[dict[str, Any]], *, seed: int,
             subsamples: int) -> dict[str, Any] | None:
    """Accuracies for N = 1, 2, 4, ..., N and per-question agreement; None when nothing is labelled.

    A question counts when every one of its candidates has a correctness (label or ground truth).
    For each N below the full N, a question's metrics are averaged over its candidate subsets.
    """
    pairs = [(q, s) for q, s in zip(questions, selections) if q.evaluable]
    if not pairs:
        return None
    n_max = len(pairs[0][0].candidates)
    by_n = []
    for n in subset_sizes(n_max):
        means: dict[str, list[float]] = {key: [] for key in ("prm", "majority", "random", "oracle")}
        for q, s in pairs:
            # A string seed: the same subsets on every machine and for every PYTHONHASHSEED.
            subsets = candidate_subsets(n_max, n, subsamples=subsamples, rng=random.Random(f"{seed}:{n}:{q.qid}"))
            outcomes = [_outcome(q, s["chain_scores"], among) for among in subsets]
            for key, values in means.items():
                values.append(math.fsum(o[key] for o in outcomes) / len(outcomes))
        by_n.append({"n": n, "subsets_per_question": len(subsets),
                     **{key: math.fsum(values) / len(values) for key, values in means.items()}})
    per_question = []
    for q, s in pairs:
        answers = [None if c.answer is None else normalize_answer(c.answer) for c in q.candidates]
        vote = majority_vote([c.answer for c in q.candidates])
        voted = None if vote is None else answers[vote]
        per_question.append({
            "id": q.qid, "num_correct": sum(bool(c.correct) for c in q.candidates),
            "prm_index": s["best_index"], "prm_answer": s["best_answer"], "prm_correct": bool(s["best_correct"]),
            "majority_index": vote, "majority_answer": None if vote is None else q.candidates[vote].answer,
            "majority_votes": 0 if vote is None else answers.count(voted),
            "majority_correct": vote is not None and bool(q.candidates[vote].correct),
            "same_answer": vote is not None and answers[s["best_index"]] == voted,
        })
    agreement = {
        "same_answer": sum(p["same_answer"] for p in per_question),
        "both_correct": sum(p["prm_correct"] and p["majority_correct"] for p in per_question),
        "prm_only_correct": sum(p["prm_correct"] and not p["majority_correct"] for p in per_question),
        "majority_only_correct": sum(p["majority_correct"] and not p["prm_correct"] for p in per_question),
        "both_wrong": sum(not p["prm_correct"] and not p["majority_correct"] for p in per_question),
    }
    return {"questions": len(pairs), "skipped_unlabelled": len(questions) - len(pairs), "n_max": n_max,
            "seed": seed, "subsamples": subsamples, "by_n": by_n, "agreement_at_n_max": agreement,
            "per_question": per_question}


def format_report(report: dict[str, Any], aggregation: str) -> str:
    lines = [f"Best-of-N accuracy on {report['questions']} questions (aggregation {aggregation}; "
             f"N < {report['n_max']}: mean over the subsets of each question, seed {report['seed']})"]
    if report["skipped_unlabelled"]:
        lines.append(f"({report['skipped_unlabelled']} questions without labels or ground truth are left out)")
    lines.append(f"{'N':>4} {'subsets':>8} {'PRM':>7} {'majority':>9} {'random':>7} {'oracle':>7}")
    for row in report["by_n"]:
        lines.append(f"{row['n']:>4} {row['subsets_per_question']:>8} {row['prm']:>7.3f} {row['majority']:>9.3f} "
                     f"{row['random']:>7.3f} {row['oracle']:>7.3f}")
    a = report["agreement_at_n_max"]
    lines.append(f"PRM vs majority at N={report['n_max']}: same answer {a['same_answer']}/{report['questions']}; "
                 f"both right {a['both_correct']}, PRM only {a['prm_only_correct']}, "
                 f"majority only {a['majority_only_correct']}, both wrong {a['both_wrong']}")
    return "\n".join(lines)
