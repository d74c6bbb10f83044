"""Best-of-N, one process or several: validate (rank 0) -> score each rank's slice of the questions
-> gather -> (rank 0) select, evaluate, write.

    python -m dreamprm.bestofn --prm runs/<run>/export --candidates data/demo/candidates.json
    # several processes, each scoring a contiguous slice of the questions:
    torchrun --nproc_per_node 4 launch/bestofn.py --prm runs/<run>/export --candidates FILE

`run` takes its collectives as functions (`launch/bestofn.py` passes those of
`dreamprm.distributed`), so this package imports no training code: no trainer, no DeepSpeed, no
``torch.distributed``.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dreamprm.bestofn.candidates import Question, load_candidates
from dreamprm.bestofn.config import DEFAULT_AGGREGATION, BestOfNConfig, parse_args
from dreamprm.bestofn.evaluation import evaluate, format_report
from dreamprm.bestofn.scorer import ModelScorer, StepScorer, resolve_prm_dir
from dreamprm.bestofn.selection import select
from dreamprm.config import AGGREGATIONS, EXIT_USER_ERROR
from dreamprm.data.records import DataValidationError
from dreamprm.model.export_files import PRM_CONFIG


@dataclass(frozen=True)
class Plan:
    """Everything rank 0 validated, shared with every rank."""
    questions: list[Question]
    prm_dir: Path
    aggregation: str


def prepare(config: BestOfNConfig, *, check_prm: bool = True) -> Plan:
    """Validate the candidates and the PRM directory before anything is loaded or written."""
    problems: list[str] = []
    prm_dir, meta = resolve_prm_dir(config.prm, problems) if check_prm else (Path(config.prm), {})
    aggregation = config.aggregation or meta.get("aggregation") or DEFAULT_AGGREGATION
    if aggregation not in AGGREGATIONS:
        problems.append(f"--prm {prm_dir}: {PRM_CONFIG}: aggregation: unknown aggregation {aggregation!r} "
                        f"(pass --aggregation, one of {sorted(AGGREGATIONS)})")
    questions = load_candidates(config.candidates, config.image_root, problems=problems)
    if config.report and questions and not any(q.evaluable for q in questions):
        problems.append(f"--report {config.report}: no question has 'correct' labels or a 'ground_truth' for every "
                        "candidate, so there is nothing to evaluate")
    if problems:
        raise DataValidationError(problems)
    return Plan(questions=questions, prm_dir=prm_dir, aggregation=aggregation)


def rank_slice(num: int, rank: int, world_size: int) -> slice:
    """The contiguous slice of `num` questions a rank scores; sizes differ by at most one."""
    return slice(num * rank // world_size, num * (rank + 1) // world_size)


def _write_json(path: Path, data: Any, flag: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # a reader never sees half a file
    except OSError as err:
        raise DataValidationError([f"{flag} {path}: cannot be written ({err.__class__.__name__}: {err})"]) from err


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DataValidationError([f"--device {device}: no CUDA device is available"])
    return torch.device(device)


def _attempt(fn: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", value), ("user", message) or ("crash", traceback): what a rank tells the others."""
    try:
        return "ok", fn()
    except DataValidationError as err:
        return "user", str(err)
    except Exception:  # reported by rank 0 instead of leaving the other ranks waiting
        return "crash", traceback.format_exc()


def run(config: BestOfNConfig, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
        broadcast: Callable[[Any], Any] = lambda obj: obj,
        gather: Callable[[Any], list[Any]] = lambda obj: [obj],
        scorer: StepScorer | None = None) -> int:
    """Validate → score this rank's slice → gather → (rank 0) select, evaluate, write. Returns the exit code.

    `broadcast` (rank 0's object on every rank) and `gather` (every rank's object, in rank order)
    are the only collectives; the defaults are the one-process versions. `scorer` replaces the
    PRM (the PRM directory is then not checked).
    """
    is_main = rank == 0
    plan = broadcast(_attempt(lambda: prepare(config, check_prm=scorer is None)) if is_main else None)
    if plan[0] != "ok":
        if is_main:
            print(f"error: {plan[1]}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR if plan[0] == "user" else 1
    plan = plan[1]
    mine = plan.questions[rank_slice(len(plan.questions), rank, world_size)]

    def score() -> list[list[list[float]]]:
        if not mine:  # more ranks than questions
            return []
        model = scorer or ModelScorer.from_export(plan.prm_dir, device or _resolve_device(config.device),
                                                  config.batch_size, config.max_image_side, config.packing)
        return model(mine)

    started = time.perf_counter()
    results = gather(_attempt(score))
    if not is_main:
        return broadcast(None)
    failed = [(r, kind, text) for r, (kind, text) in enumerate(results) if kind != "ok"]
    code = 0
    if failed:
        r, kind, text = failed[0]
        print(f"error: {text}" + (f" (rank {r})" if world_size > 1 else ""), file=sys.stderr, flush=True)
        code = EXIT_USER_ERROR if kind == "user" else 1
    else:
        step_logits = [logits for _, part in results for logits in part]
        kind, text = _attempt(lambda: _finish(config, plan, step_logits, time.perf_counter() - started))
        if kind != "ok":
            print(f"error: {text}", file=sys.stderr, flush=True)
            code = EXIT_USER_ERROR if kind == "user" else 1
    return broadcast(code) if world_size > 1 else code


def _finish(config: BestOfNConfig, plan: Plan, step_logits: list[list[list[float]]], seconds: float) -> int:
    """Rank 0: selection JSON, report, summary lines."""
    questions = plan.questions
    selections = select(questions, step_logits, plan.aggregation)
    n = len(questions[0].candidates)
    prefixes = sum(len(c.prefixes) for q in questions for c in q.candidates)
    output = {"prm": str(plan.prm_dir), "candidates": str(config.candidates), "aggregation": plan.aggregation,
              "num_questions": len(questions), "n": n, "questions": selections}
    _write_json(config.output_path, output, "--output")
    print(f"scored {len(questions)} questions x {n} candidates ({prefixes} step prefixes) in {seconds:.1f} s "
          f"(loading included); selection written to {config.output_path}", flush=True)
    report = evaluate(questions, selections, seed=config.seed, subsamples=config.subsamples)
    if report is not None:
        _write_json(config.report_path, {"aggregation": plan.aggregation, **report}, "--report")
        print(format_report(report, plan.aggregation), flush=True)
        print(f"report written to {config.report_path}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))
