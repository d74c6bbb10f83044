"""Best-of-N selection and evaluation with an exported PRM.

The PRM scores every step prefix of each of the N candidate chains of a question. The step scores
of a chain are combined into one chain score by the aggregation that training uses
(`dreamprm.bilevel.aggregation`). The chain with the highest score is selected.

    python -m dreamprm.select --prm runs/<run>/export --candidates data/demo/candidates.json
    # several processes, each scoring a contiguous slice of the questions:
    torchrun --nproc_per_node 4 launch/select.py --prm runs/<run>/export --candidates FILE

The model sees a prefix exactly as training sees a meta record: the image and
``question + "\\n\\n" + chain`` in one user turn, cut at the step markers by `split_step_prefixes`.
When the candidates carry ``correct`` labels or a ``ground_truth``, a report compares PRM
selection with majority vote, a random pick and the oracle for N = 1, 2, 4, ..., N.

This module imports no training code: no trainer, no DeepSpeed, no ``torch.distributed``. The
multi-process entry point (`launch/select.py`) passes its collectives in as functions.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import re
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dreamprm.bilevel.aggregation import AGGREGATIONS, aggregate
from dreamprm.data.records import (DataValidationError, ImageChecker, _check_duplicates, _check_fields,
                                   _resolve_image, load_image, read_json_records)
from dreamprm.data.packing import make_collator
from dreamprm.data.steps import final_answer, split_step_prefixes
from dreamprm.model.prm import MODEL_INPUTS, PACKED_INPUTS

EXIT_USER_ERROR = 2
DEFAULT_AGGREGATION = "mean_logit"
# Files of an exported PRM (`dreamprm.model.loading`); named here so that checking a directory
# does not import transformers.
PRM_CONFIG = "prm_config.json"
HEAD_FILE = "score_head.safetensors"
BACKBONE_FILES = ("model.safetensors", "model.safetensors.index.json")


# ---------------------------------------------------------------------------------------- config
def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class SelectConfig:
    # input
    prm: str = _f(None, "exported PRM directory (runs/<run>/export); a run folder holding export/ works too",
                  group="input", required=True)
    candidates: str = _f(None, "candidates file: JSON list (or JSONL) of questions with N chains each "
                         "(format: data/README.md)", group="input", required=True)
    image_root: str | None = _f(None, "folder image paths are relative to (default: the candidates file's folder)",
                                group="input")
    # output
    output: str | None = _f(None, "selection JSON to write (default: runs/select/<candidates name>.json)",
                            group="output")
    report: str | None = _f(None, "evaluation report JSON, written when labels or ground truth exist "
                            "(default: the --output path with .report.json)", group="output")
    # scoring
    aggregation: str | None = _f(None, "step scores -> chain score (default: the PRM's prm_config.json "
                                 f"'aggregation', else {DEFAULT_AGGREGATION})", group="scoring",
                                 choices=tuple(AGGREGATIONS))
    batch_size: int = _f(16, "candidate chains per forward pass (one row per chain with --packing chain, "
                         "per step prefix with none)",
                         group="scoring")
    max_image_side: int = _f(512, "longest image side in pixels, as in training (--max_image_side)", group="scoring")
    device: str = _f("auto", "'auto', 'cuda', 'cuda:N' or 'cpu'", group="scoring")
    packing: str = _f("chain", "'chain': all step prefixes of a chain in one sequence, scores as one by one "
                      "(data/README.md); 'none': one sequence per prefix", group="scoring", choices=("none", "chain"))
    # report
    seed: int = _f(0, "seed of the candidate subsets drawn for N below the full N", group="report")
    subsamples: int = _f(8, "candidate subsets per question for each N below the full N "
                         "(all subsets when there are at most this many)", group="report")

    def validate(self) -> "SelectConfig":
        for name in ("batch_size", "subsamples", "max_image_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if self.device not in ("auto", "cuda", "cpu") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device: must be 'auto', 'cuda', 'cuda:N' or 'cpu', got {self.device!r}")
        return self

    @property
    def output_path(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / "select" / f"{Path(self.candidates).stem}.json"

    @property
    def report_path(self) -> Path:
        return Path(self.report) if self.report else self.output_path.with_suffix(".report.json")


def build_parser(prog: str = "python -m dreamprm.select") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Best-of-N selection and evaluation with an exported PRM.")
    types = {"int": int, "str": str, "str | None": str}
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(SelectConfig):
        if f.metadata["group"] not in groups:
            groups[f.metadata["group"]] = parser.add_argument_group(f.metadata["group"])
        group = groups[f.metadata["group"]]
        kwargs: dict[str, Any] = {"help": f.metadata["help"], "type": types[str(f.type)]}
        if f.metadata.get("required"):
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            if f.default is not None:
                kwargs["help"] += f" (default: {f.default})"
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(f"--{f.name}", **kwargs)
    # The deepspeed launcher appends --local_rank; ranks come from the environment.
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m dreamprm.select") -> SelectConfig:
    """Flags -> validated, frozen config; a bad flag exits 2 with argparse's message."""
    parser = build_parser(prog)
    values = vars(parser.parse_args(argv))
    try:
        return SelectConfig(**{f.name: values[f.name] for f in dataclasses.fields(SelectConfig)}).validate()
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


# ------------------------------------------------------------------------------------ candidates
@dataclass(frozen=True)
class Candidate:
    text: str
    prefixes: tuple[str, ...]  # model texts: question + "\n\n" + chain, cut at the step markers
    answer: str | None  # `final_answer(text)`
    correct: bool | None  # the `correct` label, else answer == ground_truth, else unknown


@dataclass(frozen=True)
class Question:
    qid: str
    image_path: Path
    question: str
    candidates: tuple[Candidate, ...]
    ground_truth: str | None
    source: str  # "FILE:record N", for messages

    @property
    def evaluable(self) -> bool:
        return all(c.correct is not None for c in self.candidates)


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")


def normalize_answer(answer: str) -> str:
    """The form answers are compared in: case-folded, whitespace collapsed, surrounding ``$``/``**``
    and a trailing period dropped, numbers canonical (``"3.0"`` -> ``"3"``).

    >>> normalize_answer(" **Yes.** "), normalize_answer("$3.50$"), normalize_answer("7")
    ('yes', '3.5', '7')
    """
    text = " ".join(answer.split()).casefold()
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip("*$").strip().rstrip(".").strip()
    if _NUMBER.fullmatch(text):
        value = float(text)
        if math.isfinite(value):
            return str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else repr(value)
    return text


_QUESTION_FIELDS = {"id": ((str, int), False), "image_path": (str, True), "question": (str, True),
                    "candidates": (list, True), "ground_truth": ((str, int, float), False)}
_CANDIDATE_FIELDS = {"text": (str, True), "correct": (bool, False)}


def _build_question(record: Any, where: str, index: int, root: Path, images: ImageChecker,
                    problems: list[str]) -> Question | None:
    ok = _check_fields(record, where, _QUESTION_FIELDS, problems)
    if not isinstance(record, dict):
        return None
    # Whatever is usable is checked further even when another field is bad: all problems at once.
    text = record.get("question") if isinstance(record.get("question"), str) else None
    chains = record.get("candidates") if isinstance(record.get("candidates"), list) else []
    if text is not None and not text.strip():
        problems.append(f"{where}: question: is empty")
        ok = False
    if isinstance(record.get("candidates"), list) and not chains:
        problems.append(f"{where}: candidates: is empty (each question needs N >= 1 chains)")
        ok = False
    truth = None if record.get("ground_truth") is None else str(record["ground_truth"])
    candidates = []
    for j, raw in enumerate(chains):
        at = f"{where}: candidates[{j}]"
        if not _check_fields(raw, at, _CANDIDATE_FIELDS, problems):
            ok = False
            continue
        if not split_step_prefixes(raw["text"]):
            problems.append(f"{at}: text: no step markers ('Step 1:', 'Step 2:', ...) in the chain of thought")
            ok = False
            continue
        if not ok:
            continue
        # The meta-record text: the question comes before "Step 1" and belongs to every prefix.
        prefixes = tuple(split_step_prefixes(text + "\n\n" + raw["text"]))
        answer = final_answer(raw["text"])
        if raw.get("correct") is not None:
            correct = raw["correct"]
        elif truth is not None:
            correct = answer is not None and normalize_answer(answer) == normalize_answer(truth)
        else:
            correct = None
        candidates.append(Candidate(text=raw["text"], prefixes=prefixes, answer=answer, correct=correct))
    has_path = isinstance(record.get("image_path"), str)
    image = _resolve_image(record, where, root, images, problems) if has_path else None
    if not ok or image is None:
        return None
    qid = record.get("id")
    return Question(qid=str(index) if qid is None else str(qid), image_path=image, question=text,
                    candidates=tuple(candidates), ground_truth=truth, source=where)


def load_candidates(path: str | Path, image_root: str | Path | None = None, *, problems: list[str] | None = None,
                    images: ImageChecker | None = None) -> list[Question]:
    """Questions of a candidates file, validated. Pass `problems` to collect instead of raising."""
    collect = problems is not None
    problems = [] if problems is None else problems
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    images = images or ImageChecker()
    records = read_json_records(path, problems)
    questions = []
    for index, record in enumerate(records):
        question = _build_question(record, f"{path}:record {index}", index, root, images, problems)
        if question is not None:
            questions.append(question)
    _check_same_n(path, records, problems)
    # Over the records, not the questions built: a duplicate of a broken record is still a duplicate.
    ids = [(str(r["id"]), f"{path}:record {i}") for i, r in enumerate(records)
           if isinstance(r, dict) and isinstance(r.get("id"), (str, int))]
    _check_duplicates(ids, "id", problems)
    if not records and not problems:
        problems.append(f"{path}: file: contains no records")
    if problems and not collect:
        raise DataValidationError(problems)
    return questions


def _check_same_n(path: Path, records: list[Any], problems: list[str]) -> None:
    """Every question needs the same N; the odd ones out are named against the most common N."""
    sizes = {i: len(r["candidates"]) for i, r in enumerate(records)
             if isinstance(r, dict) and isinstance(r.get("candidates"), list) and r["candidates"]}
    if len(set(sizes.values())) <= 1:
        return
    counts = Counter(sizes.values())
    # The most common N; on a tie, the N of the earliest record.
    usual = max(counts, key=lambda n: (counts[n], -min(i for i, k in sizes.items() if k == n)))
    first = min(i for i, k in sizes.items() if k == usual)
    for i, n in sizes.items():
        if n != usual:
            problems.append(f"{path}:record {i}: candidates: has {n} chains, but {counts[usual]} questions have "
                            f"N = {usual} (first: record {first}); every question needs the same N")


# ---------------------------------------------------------------------------------- PRM directory
def resolve_prm_dir(path: str | Path, problems: list[str]) -> tuple[Path, dict[str, Any]]:
    """The exported PRM directory and its prm_config.json; problems are appended, not raised."""
    path = Path(path)
    if (path / "export" / PRM_CONFIG).is_file() and not (path / PRM_CONFIG).exists():
        path = path / "export"  # a training run folder
    if not path.exists():
        problems.append(f"--prm {path}: no such directory")
        return path, {}
    if not path.is_dir():
        problems.append(f"--prm {path}: not a directory (pass an exported PRM: runs/<run>/export)")
        return path, {}
    if not (path / PRM_CONFIG).is_file():
        # A run folder, its checkpoints/ folder, or one checkpoint (DeepSpeed shards; not read here).
        if (path / "manifest.json").is_file() or (path / "checkpoints").is_dir() or any(path.glob("step_*")):
            problems.append(f"--prm {path}: a training run or checkpoint, not an exported PRM; pass the run's "
                            "export/ folder (training writes it at the end unless --no-export)")
        else:
            problems.append(f"--prm {path}: {PRM_CONFIG} is missing, so this is not an exported PRM "
                            "(training writes one to runs/<run>/export)")
        return path, {}
    meta: Any = None
    try:
        meta = json.loads((path / PRM_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"--prm {path}: {PRM_CONFIG} cannot be read ({err.__class__.__name__}: {err})")
    except json.JSONDecodeError as err:
        problems.append(f"--prm {path}: {PRM_CONFIG}: invalid JSON ({err.msg} at line {err.lineno} column {err.colno})")
    else:
        if not isinstance(meta, dict):
            problems.append(f"--prm {path}: {PRM_CONFIG}: must be a JSON object, found {type(meta).__name__}")
        elif meta.get("head") not in ("logits", "hidden"):
            problems.append(f"--prm {path}: {PRM_CONFIG}: head: must be 'logits' or 'hidden', "
                            f"found {meta.get('head')!r}")
    for name in (HEAD_FILE, "config.json"):
        if not (path / name).is_file():
            problems.append(f"--prm {path}: {name} is missing")
    if not any((path / name).is_file() for name in BACKBONE_FILES):
        problems.append(f"--prm {path}: backbone weights are missing (expected {' or '.join(BACKBONE_FILES)})")
    return path, meta if isinstance(meta, dict) else {}


# ---------------------------------------------------------------------------------------- scoring
# A scorer maps questions to step logits: [question][candidate][step]. Tests substitute their own.
StepScorer = Callable[[Sequence[Question]], list[list[list[float]]]]


class ModelScorer:
    """Step logits from the PRM, `batch_size` chains (all their step prefixes) per forward pass;
    ``packing`` 'chain' puts each chain in one row (`dreamprm.data.packing`), 'none' each prefix."""

    def __init__(self, model: torch.nn.Module, processor: Any, device: torch.device, batch_size: int,
                 max_image_side: int, packing: str = "chain"):
        self.model = model.float().eval()  # fp32: selection compares scores that may be close
        self.collator = make_collator(processor, packing)
        self.device = device
        self.batch_size = batch_size
        self.max_image_side = max_image_side

    @classmethod
    def from_export(cls, path: str | Path, device: torch.device, batch_size: int, max_image_side: int,
                    packing: str = "chain") -> "ModelScorer":
        from dreamprm.model.loading import load_exported_prm
        try:
            model, processor, _ = load_exported_prm(path, dtype=torch.float32, device=device)
        except Exception as err:  # a damaged file can fail in safetensors, json, transformers, ...
            raise DataValidationError([f"--prm {path}: cannot be loaded ({err.__class__.__name__}: {err})"]) from err
        return cls(model, processor, device, batch_size, max_image_side, packing)

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The one place tensors move to the device.
        keys = MODEL_INPUTS + PACKED_INPUTS + ("score_index",)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k in keys}

    @torch.no_grad()
    def __call__(self, questions: Sequence[Question]) -> list[list[list[float]]]:
        chains = [(q, c) for q in range(len(questions)) for c in range(len(questions[q].candidates))]
        out: list[list[list[float]]] = [[[] for _ in q.candidates] for q in questions]
        images: dict[int, Any] = {}
        for start in range(0, len(chains), self.batch_size):
            chunk = chains[start:start + self.batch_size]
            # The N chains of a question share its image: load it once, keep it while it is needed.
            images = {q: images[q] if q in images else load_image(questions[q].image_path, self.max_image_side)
                      for q, _ in chunk}
            items = [{"image": images[q], "texts": list(questions[q].candidates[c].prefixes), "domain": -1,
                      "target": 0.0} for q, c in chunk]
            batch = self.collator(items)
            logits = self.model(**self._inputs(batch)).float().cpu()  # (prefixes,)
            for k, (q, c) in enumerate(chunk):
                out[q][c] = logits[batch["item_index"] == k].tolist()
        return out


# -------------------------------------------------------------------------------------- selection
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


# ------------------------------------------------------------------------------------- evaluation
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


# ------------------------------------------------------------------------------------------- run
@dataclass(frozen=True)
class Plan:
    """Everything rank 0 validated, shared with every rank."""
    questions: list[Question]
    prm_dir: Path
    aggregation: str


def prepare(config: SelectConfig, *, check_prm: bool = True) -> Plan:
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


def run(config: SelectConfig, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
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


def _finish(config: SelectConfig, plan: Plan, step_logits: list[list[list[float]]], seconds: float) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
