"""Scores the first records of a training file with the DeepSpeed engine restored from a checkpoint
(run as a subprocess by test_training.py). Usage: engine_scores.py OUT.json TRAIN_FLAGS..."""
from __future__ import annotations

import json
import sys

import torch

from dreamprm.model.prm import model_inputs
from dreamprm.config import parse_args
from dreamprm.data.datasets import PRMCollator, TrainDataset
from dreamprm.data.records import load_train_records
from dreamprm.distributed.engine import init_distributed, shutdown
from dreamprm.trainer import Trainer


def main() -> None:
    out, flags = sys.argv[1], sys.argv[2:]
    config = parse_args(flags)
    info = init_distributed("cpu")
    trainer = Trainer(config, info)
    records = load_train_records(config.data.train_json_file)[:6]
    batch = PRMCollator(trainer.processor)([TrainDataset(records, trainer.domains)[i] for i in range(len(records))])
    trainer.engine.module_engine.eval()
    with torch.no_grad():
        logits = trainer.engine.forward(model_inputs(trainer.engine.to_device(batch)))
    if info.rank == 0:
        json.dump({"step": trainer.state.step, "logits": logits.tolist()}, open(out, "w"))
    shutdown()


if __name__ == "__main__":
    main()
