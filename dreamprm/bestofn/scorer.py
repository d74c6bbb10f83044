"""The exported PRM as a scorer: its folder checked before anything loads, then step logits for
every step prefix of every candidate.

A scorer maps questions to step logits, ``[question][candidate][step]``; tests substitute their own
(`StepScorer`). `ModelScorer` runs the PRM in float32 and packs each chain into one sequence by
default (``packing='chain'``, scores equal to one prefix at a time: data/README.md).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dreamprm.bestofn.candidates import Question
from dreamprm.data.chat import chain_layout
from dreamprm.data.packing import make_collator
from dreamprm.data.records import DataValidationError, load_image
from dreamprm.model.export_files import BACKBONE_FILES, HEAD_FILE, PRM_CONFIG
from dreamprm.model.prm import MODEL_KEYS


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
        elif meta.get("head") not in ("logits", "hidden", "generative"):
            problems.append(f"--prm {path}: {PRM_CONFIG}: head: must be 'logits', 'hidden' or 'generative', "
                            f"found {meta.get('head')!r}")
        elif meta["head"] == "generative" and not (isinstance(meta.get("judge_ids"), list)
                                                   and len(meta["judge_ids"]) == 2
                                                   and all(isinstance(i, int) for i in meta["judge_ids"])):
            problems.append(f"--prm {path}: {PRM_CONFIG}: judge_ids: the generative head needs the two judgement "
                            f"token ids [positive, negative], found {meta.get('judge_ids')!r}")
    # The generative head has no head file: the backbone's language-model head judges.
    needed = ("config.json",) if isinstance(meta, dict) and meta.get("head") == "generative" else (HEAD_FILE, "config.json")
    for name in needed:
        if not (path / name).is_file():
            problems.append(f"--prm {path}: {name} is missing")
    if not any((path / name).is_file() for name in BACKBONE_FILES):
        problems.append(f"--prm {path}: backbone weights are missing (expected {' or '.join(BACKBONE_FILES)})")
    return path, meta if isinstance(meta, dict) else {}


# A scorer maps questions to step logits: [question][candidate][step]. Tests substitute their own.
StepScorer = Callable[[Sequence[Question]], list[list[list[float]]]]


class ModelScorer:
    """Step logits from the PRM, `batch_size` chains (all their step prefixes) per forward pass;
    ``packing`` 'chain' puts each chain in one row (`dreamprm.data.packing`), 'none' each prefix."""

    def __init__(self, model: torch.nn.Module, processor: Any, device: torch.device, batch_size: int,
                 max_image_side: int, packing: str = "chain", judge_tokens: str = "+,-"):
        self.model = model.float().eval()  # fp32: selection compares scores that may be close
        # The layout the PRM was trained with (generative: one step per turn), through its backbone's adapter.
        self.collator = make_collator(processor, packing, chain_layout(model.head_type, judge_tokens), model.adapter)
        self.device = device
        self.batch_size = batch_size
        self.max_image_side = max_image_side

    @classmethod
    def from_export(cls, path: str | Path, device: torch.device, batch_size: int, max_image_side: int,
                    packing: str = "chain") -> "ModelScorer":
        from dreamprm.model.loading import load_exported_prm
        try:
            model, processor, meta = load_exported_prm(path, dtype=torch.float32, device=device)
        except Exception as err:  # a damaged file can fail in safetensors, json, transformers, ...
            raise DataValidationError([f"--prm {path}: cannot be loaded ({err.__class__.__name__}: {err})"]) from err
        return cls(model, processor, device, batch_size, max_image_side, packing, meta.get("judge_tokens", "+,-"))

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The one place tensors move to the device.
        keys = MODEL_KEYS
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k in keys}

    @torch.no_grad()
    def __call__(self, questions: Sequence[Question]) -> list[list[list[float]]]:
        chains = [(q, c) for q in range(len(questions)) for c in range(len(questions[q].candidates))]
        logits = score_chains(lambda batch: self.model(**self._inputs(batch)), self.collator, questions, chains,
                              self.batch_size, self.max_image_side)
        out: list[list[list[float]]] = [[[] for _ in q.candidates] for q in questions]
        for (q, c), chain in zip(chains, logits):
            out[q][c] = chain
        return out


# A forward pass: a collated CPU batch -> one logit per step prefix, (prefixes,).
Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def score_chains(forward: Forward, collator: Any, questions: Sequence[Question], chains: Sequence[tuple[int, int]],
                 batch_size: int, max_image_side: int, min_batches: int = 0) -> list[list[float]]:
    """Step logits of each chain in `chains` ((question, candidate) indices), `batch_size` chains a forward.

    The one scoring loop of Best-of-N, shared by the exported PRM (`ModelScorer`) and the live
    ZeRO-3 engine during training (`dreamprm.evaluation`). `min_batches`: run at least this many
    forward passes, repeating the last batch (or the first chain of `questions`) and dropping
    the result: under ZeRO-3 every forward gathers parameters collectively, so every rank must run
    as many as the busiest one.
    """
    out: list[list[float]] = []
    images: dict[int, Any] = {}
    starts = list(range(0, len(chains), batch_size))
    padding = max(0, min_batches - len(starts))
    for i in range(len(starts) + padding):
        chunk = chains[starts[i]:starts[i] + batch_size] if i < len(starts) else list(chains[-batch_size:] or [(0, 0)])
        # The N chains of a question share its image: load it once, keep it while it is needed.
        images = {q: images[q] if q in images else load_image(questions[q].image_path, max_image_side)
                  for q, _ in chunk}
        items = [{"image": images[q], "texts": list(questions[q].candidates[c].prefixes), "domain": -1,
                  "target": 0.0} for q, c in chunk]
        batch = collator(items)
        logits = forward(batch).float().cpu()  # (prefixes,)
        if i < len(starts):
            out.extend(logits[batch["item_index"] == k].tolist() for k in range(len(chunk)))
    return out
