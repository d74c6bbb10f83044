"""Best-of-N validation during training: a held-out candidates file scored by the live PRM.

Every `--eval_every` steps, every rank scores its contiguous share of the candidate chains with
the ZeRO-3 engine itself (no export, nothing written), packed as Best-of-N packs them; one
object all-gather brings the step logits together and every rank computes the same selection and
evaluation (`dreamprm.bestofn`: the same candidates schema, selection, aggregation and report as
``python -m dreamprm.bestofn`` on an export). Every rank holding the same numbers lets them take
the same `--keep_best` decision, which is a collective checkpoint.

Metrics (higher is better, the names `--keep_best` takes): ``best_of_N`` for N = 1, 2, 4, ... up to
the file's N (PRM selection, N < max: mean over seeded subsets as Best-of-N reports them) and
``auc``, the PRM's AUC over every labelled candidate (chain score against correctness).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from dreamprm.bestofn.candidates import Question, load_candidates
from dreamprm.bestofn.evaluation import evaluate, subset_sizes
from dreamprm.bestofn.run import rank_slice
from dreamprm.bestofn.scorer import score_chains
from dreamprm.bestofn.selection import select
from dreamprm.config import ConfigError
from dreamprm.data.records import DataValidationError
from dreamprm.model.prm import model_inputs
from dreamprm.ranking import auc, average_ranks  # noqa: F401  (re-exported: reports and tests use them here)


def load_eval_questions(path: str, image_root: str | None, keep_best: str | None) -> list[Question]:
    """The --eval_candidates file, validated like a Best-of-N input; every question needs labels or a
    ground truth, and `keep_best`'s N must be one the file has. Raises DataValidationError/ConfigError."""
    questions = load_candidates(path, image_root)
    unlabelled = [q.source for q in questions if not q.evaluable]
    if unlabelled:
        raise DataValidationError([f"{where}: candidates: --eval_candidates needs 'correct' labels or a "
                                   "'ground_truth' for every candidate" for where in unlabelled])
    if keep_best:
        names = metric_names(len(questions[0].candidates))
        if keep_best not in names:
            raise ConfigError(f"--keep_best {keep_best}: {path} has N = {len(questions[0].candidates)} candidates "
                              f"per question, so the metrics are {', '.join(names)}")
    return questions


def metric_names(n_max: int) -> list[str]:
    return [f"best_of_{n}" for n in subset_sizes(n_max)] + ["auc"]


class Evaluator:
    """Scores the candidates with an engine (duck-typed: `forward`, `to_device`, `module`, `info`,
    `release_gathered_parameters`) and returns the metrics, the same on every rank."""

    def __init__(self, questions: list[Question], collator: Any, *, batch_size: int,
                 max_image_side: int, aggregation: str, rank: int, world_size: int,
                 gather: Callable[[Any], list[Any]], seed: int = 0, subsamples: int = 8):
        self.questions = questions
        self.collator = collator  # the run's (build.collator: packing, the head's layout, the backbone's adapter)
        self.batch_size, self.max_image_side, self.aggregation = batch_size, max_image_side, aggregation
        self.gather, self.seed, self.subsamples = gather, seed, subsamples
        chains = [(q, c) for q in range(len(questions)) for c in range(len(questions[q].candidates))]
        self.mine = chains[rank_slice(len(chains), rank, world_size)]
        # Every rank runs as many forwards as the rank with the most chains (ZeRO-3 gathers collectively).
        most = max(len(chains[rank_slice(len(chains), r, world_size)]) for r in range(world_size))
        self.batches = -(-most // batch_size)

    def __call__(self, engine: Any) -> dict[str, float]:
        started = time.perf_counter()
        module = engine.module
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                mine = score_chains(lambda batch: engine.forward(model_inputs(engine.to_device(batch))), self.collator,
                                    self.questions, self.mine, self.batch_size, self.max_image_side,
                                    min_batches=self.batches)
        finally:
            module.train(was_training)
            # Parameters gathered by a no-grad forward stay cached; the next optimiser step must be seen.
            engine.release_gathered_parameters()
        step_logits: list[list[list[float]]] = [[[] for _ in q.candidates] for q in self.questions]
        for part in self.gather(list(zip([tuple(c) for c in self.mine], mine))):
            for (q, c), logits in part:
                step_logits[q][c] = logits
        return self.metrics(step_logits) | {"seconds": time.perf_counter() - started}

    def metrics(self, step_logits: list[list[list[float]]]) -> dict[str, float]:
        """{best_of_N: ..., auc: ...} of step logits [question][candidate][step]."""
        selections = select(self.questions, step_logits, self.aggregation)
        report = evaluate(self.questions, selections, seed=self.seed, subsamples=self.subsamples)
        values = {f"best_of_{row['n']}": row["prm"] for row in report["by_n"]}
        scores = [s for sel in selections for s in sel["chain_scores"]]
        labels = [bool(c.correct) for q in self.questions for c in q.candidates]
        area = auc(scores, labels)
        if area is not None:
            values["auc"] = area
        return values


def describe(step: int, values: dict[str, float]) -> str:
    """One console line: 'eval at step 20: best_of_1 0.417, best_of_2 0.458, ..., auc 0.612 (1.2 s)'."""
    shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if k != "seconds")
    return f"eval at step {step}: {shown} ({values.get('seconds', 0.0):.1f} s)"


def within_share(eval_seconds: float, run_seconds: float, max_share: float) -> bool:
    """Whether the evaluations so far stay within `max_share` of the run's time (then the next may run).

    >>> within_share(4.0, 100.0, 0.05), within_share(6.0, 100.0, 0.05), within_share(0.0, 0.0, 0.05)
    (True, False, True)
    """
    return eval_seconds <= max_share * run_seconds


def is_better(value: float, best: float | None) -> bool:
    """Every metric here is higher-is-better; the first value is always the best so far."""
    return best is None or value > best

