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
from dreamprm.cli import run_training  # noqa: E402


def parse_plan(spec: str) -> dict[str, set[int]]:
    plan: dict[str, set[int]] = {"lower": set(), "upper": set()}
    for part in filter(None, spec.split(";")):
        level, _, steps = part.partition(":")
        plan[level].update(int(s) for s in steps.split(","))
    return plan


def install(plan: dict[str, set[int]]) -> None:
    trainer_cls = trainer_module.Trainer
    current: dict[str, trainer_module.Trainer] = {}
    lower_step, run_upper_step = trainer_cls.lower_step, trainer_cls.run_upper_step
    per_sample_mse, chain_meta_loss = trainer_module.per_sample_mse, upper_module.chain_meta_loss

    def on_rank0(level: str, step: int) -> bool:
        return int(os.environ.get("RANK", "0")) == 0 and step in plan[level]

    def nan_lower_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = per_sample_mse(logits, target)
        return loss * float("nan") if on_rank0("lower", current["trainer"].state.step + 1) else loss

    def nan_meta_loss(*args, **kwargs) -> torch.Tensor:
        loss = chain_meta_loss(*args, **kwargs)
        return loss * float("nan") if on_rank0("upper", current["trainer"].state.upper_steps + 1) else loss

    def tracked(method):
        def wrapper(self, *args, **kwargs):
            current["trainer"] = self
            return method(self, *args, **kwargs)
        return wrapper

    trainer_cls.lower_step, trainer_cls.run_upper_step = tracked(lower_step), tracked(run_upper_step)
    trainer_module.per_sample_mse, upper_module.chain_meta_loss = nan_lower_loss, nan_meta_loss


if __name__ == "__main__":
    install(parse_plan(sys.argv[1]))
    sys.exit(run_training(sys.argv[2:]))
