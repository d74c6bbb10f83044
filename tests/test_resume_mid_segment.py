"""A run resumed from a checkpoint written mid-segment ends with the uninterrupted run's parameters.

With --hypergrad_batches segment (the default) the upper step differentiates every training batch of
its segment; a stop (SIGUSR1/SIGTERM, or a periodic checkpoint) can land after any lower step, so
the resumed run must read the segment's earlier batches again. Before that was done the resumed
upper step saw only the batches read after the resume: domain weights 1.097/1.036 instead of
1.081/1.075 after 6 steps (measured), and every exported tensor differed.

One rank, fp32, AdamW and the mse objective (every upper step moves the weights), 3 lower steps
per segment with 2 micro-batches each: checkpoints after every step; resumes from the first and the
second step of a segment.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import exported_tensors, read_json, run_train, run_trains, small_run_args
from dreamprm.trainer import TrainState

STEPS = 7


def _args(model, out, *extra):
    return small_run_args(model, out, "--batch_size", "1", "--gradiant_accumulation", "2", "--unroll_steps", "3",
                          "--iteration_num", str(STEPS), "--save_every_iterations", "1", "--keep_last", "100",
                          "--meta_optimizer", "adamw", "--meta_loss", "mse", *extra)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("mid_segment")
    run_train(_args(tiny_model, root / "plain"))
    resumed = {}
    for step in (4, 5):  # 1 and 2 of the segment's 3 lower steps done
        out = root / f"from_{step}"
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(root / "plain" / "checkpoints" / f"step_{step:08d}", out / "checkpoints" / f"step_{step:08d}")
        resumed[step] = out
    procs = run_trains([{"args": _args(tiny_model, out, "--resume", "auto")} for out in resumed.values()])
    return root / "plain", resumed, procs


@pytest.mark.slow
def test_a_resume_mid_segment_follows_the_uninterrupted_trajectory(runs):
    plain, resumed, procs = runs
    reference = exported_tensors(plain / "export")
    weights = read_json(plain / "domain_weights.json")["weights"]
    assert len(set(weights.values())) > 1, weights  # the upper steps moved the weights
    for (step, out), proc in zip(resumed.items(), procs):
        assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'} at step {step}" in proc.stdout
        assert read_json(out / "domain_weights.json")["weights"] == weights, step
        tensors = exported_tensors(out / "export")
        differ = [k for k in reference if not torch.equal(reference[k], tensors[k])]
        assert not differ, f"resumed at step {step}: {len(differ)} of {len(reference)} tensors differ"


def test_a_checkpoint_without_the_segment_start_still_loads():
    """Checkpoints written before the segment's start was kept: no position, and a resume warns."""
    flat = TrainState(step=4).as_dict()
    del flat["segment_train_epoch"], flat["segment_train_batch"]
    state = TrainState.from_dict(flat)
    assert state.step == 4 and state.segment_train is None
    assert TrainState.from_dict(state.as_dict()) == state
