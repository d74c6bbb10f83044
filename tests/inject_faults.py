"""launch/train.py with non-finite values injected on rank 0 alone, from the tests' side.

    python tests/inject_faults.py "lower:3,4;upper:2" <launch/train.py flags>   (under torchrun for ranks)

'lower:N' makes rank 0's training loss NaN at optimiser step N; 'upper:N' makes rank 0's meta loss
NaN at the N-th upper step. The trainer must skip those updates on every rank (one all-reduce
decides), and stop with a checkpoint after --max_bad_steps in a row. Nothing here is reachable from
the product's command line.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import dreamprm.bilevel.upper as upper_module  # noqa: E402
import dreamprm.trainer as trainer_module  # noqa: E402
from dreamprm.cli import exit_now, run_training  # noqa: E402


def parse_plan(spec: str) -> dict[str, set[int]]:
    plan: dict[str, set[int]] = {"lower": set(), "upper": set()}
    for part in filter(None, spec.split(";")):
        level, _, steps = part.partition(":")
        plan[level].update(int(s) for s in steps.split(","))
    return plan


def install(plan: dict[str, set[int]]) -> None:
    trainer_cls = trainer_module.Trainer
    current: dict[str, object] = {}
    lower_step, run_upper_step = trainer_cls.lower_step, trainer_cls.run_upper_step
    lower_loss_of, chain_meta_loss = trainer_module.lower_loss, upper_module.chain_meta_loss

    def on_rank0(level: str, step: int) -> bool:
        return int(os.environ.get("RANK", "0")) == 0 and step in plan[level]

    def nan_lower_loss_of(*args, **kwargs):
        # The trainer builds its lower loss once (by head); the NaN goes into the lower step's calls
        # only, not into the upper step's passes that reuse the same loss.
        loss_of = lower_loss_of(*args, **kwargs)

        def nan_lower_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            loss = loss_of(logits, target)
            inside = current.get("level") == "lower"
            return loss * float("nan") if inside and on_rank0("lower", current["trainer"].state.step + 1) else loss
        return nan_lower_loss

    def nan_meta_loss(*args, **kwargs) -> torch.Tensor:
        loss = chain_meta_loss(*args, **kwargs)
        return loss * float("nan") if on_rank0("upper", current["trainer"].state.upper_steps + 1) else loss

    def tracked(method, level: str):
        def wrapper(self, *args, **kwargs):
            current["trainer"], current["level"] = self, level
            try:
                return method(self, *args, **kwargs)
            finally:
                current["level"] = None
        return wrapper

    trainer_cls.lower_step, trainer_cls.run_upper_step = tracked(lower_step, "lower"), tracked(run_upper_step, "upper")
    trainer_module.lower_loss, upper_module.chain_meta_loss = nan_lower_loss_of, nan_meta_loss

if __name__ == "__main__":
    install(parse_plan(sys.argv[1]))
    exit_now(run_training(sys.argv[2:]))
