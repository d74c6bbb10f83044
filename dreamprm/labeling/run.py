"""``dreamprm-label``: label one shard, merge shards, import VisualPRM-400K (docs/labeling.md).

    dreamprm-label --questions q.jsonl --policy DIR --out runs/label --shard 0/4   # one of 4 shards
    dreamprm-label merge --out runs/label                                          # -> train/meta/candidates.json
    dreamprm-label import-visualprm --annotations annotations/ --out data/visualprm/train.json

Order of a labelling run: flags, questions (validated whole), verifier, policy directory, shard
file (resumed if it exists) -- every user error before the model loads and before anything is
written -- then the engine and the questions of the shard not yet done. SIGTERM or SIGUSR1 (Slurm's
warning) ends the run after the current question with exit 75, so the job script requeues it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from dreamprm.config import EXIT_USER_ERROR, ConfigError
from dreamprm.data.records import DataValidationError
from dreamprm.labeling.config import ImportConfig, LabelConfig, MergeConfig, parse_args
from dreamprm.labeling.merge import merge
from dreamprm.labeling.questions import load_questions
from dreamprm.labeling.shards import ShardWriter, in_shard, parse_shard, shard_path
from dreamprm.labeling.verify import get_verifier
from dreamprm.preemption import EXIT_PREEMPTED, StopRequest


def check_policy(path: str) -> Path:
    policy = Path(path)
    if not (policy / "config.json").is_file():
        raise ConfigError(f"--policy {path}: not a model directory (no config.json); nothing is downloaded")
    return policy.resolve()


def label(config: LabelConfig, stop: StopRequest) -> int:
    index, count = parse_shard(config.shard)
    questions = load_questions(config.questions, config.image_root)
    try:
        verifier = get_verifier(config.verifier, config.tolerance)
    except ImportError as err:
        raise ConfigError(f"--verifier {config.verifier}: {err}") from None
    policy = check_policy(config.policy)
    if config.engine == "vllm":
        from dreamprm.labeling.engines.vllm_engine import import_vllm
        try:
            import_vllm()  # before the shard file is opened: a missing extra writes nothing
        except ImportError as err:
            raise ConfigError(str(err)) from None
    mine = [q for q in questions if in_shard(q.qid, index, count)]
    identity = {**config.identity(), "questions": str(Path(config.questions).resolve()), "policy": str(policy),
                "shard": f"{index}/{count}"}
    writer = ShardWriter(shard_path(Path(config.out), index, count), identity, len(mine))
    todo = [q for q in mine if q.qid not in writer.done]
    print(f"shard {index}/{count}: {len(mine)} of {len(questions)} questions, {len(mine) - len(todo)} done before, "
          f"{len(todo)} to do -> {writer.path}", file=sys.stderr, flush=True)
    if not todo:
        writer.close()
        return 0

    from dreamprm.labeling.engines import build_engine
    from dreamprm.labeling.montecarlo import label_question
    from dreamprm.labeling.progress import Progress

    engine = build_engine(config.engine, policy, device=config.device, dtype=config.dtype,
                          tensor_parallel_size=config.tensor_parallel_size, seed=config.seed,
                          max_model_len=config.max_model_len, gpu_memory_utilization=config.gpu_memory_utilization,
                          max_image_side=config.max_image_side)
    settings = config.settings()
    progress = Progress(len(mine), len(mine) - len(todo), f"shard {index}/{count}", config.progress)
    try:
        for q in todo:
            if stop.signum:
                print(f"stopping on {stop.name}: {len(writer.done)} of {len(mine)} questions written; "
                      "rerun the same command to resume", file=sys.stderr, flush=True)
                return EXIT_PREEMPTED
            work = label_question(engine, q, settings, verifier)
            writer.add(q.qid, work.records)
            progress.update(work.rollouts, work.tokens)
    finally:
        progress.close()
        writer.close()
        engine.close()
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "dreamprm-label") -> int:
    stop = StopRequest().install()
    argv = list(sys.argv[1:] if argv is None else argv)
    command, config = parse_args(argv, prog)
    try:
        if command == "merge":
            assert isinstance(config, MergeConfig)
            to = Path(config.to or config.out)
            written = merge(Path(config.out), to, balance=config.balance_meta, seed=config.seed,
                            allow_partial=config.allow_partial)
            for name, n in written.items():
                print(f"wrote {to / name}: {n} records")
            return 0
        if command == "import-visualprm":
            assert isinstance(config, ImportConfig)
            from dreamprm.labeling.visualprm import import_visualprm
            source = Path(config.annotations)
            files = sorted(source.glob("*.jsonl")) if source.is_dir() else [Path(p) for p in config.annotations.split(",")]
            n = import_visualprm(files, Path(config.out), config.image_prefix)
            print(f"wrote {config.out}: {n} records from {len(files)} annotation files")
            return 0
        return label(config, stop)
    except (ConfigError, DataValidationError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
