"""Building the trainer's parts from a config: each function makes one part and checks what it needs.

Called in this order by `Trainer.__init__`; every check that can refuse a run (flags, records,
output folder) comes before anything is written.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from dreamprm.bilevel.domain_weights import DomainWeights
from dreamprm.bilevel.instance_net import InstanceNet, RecordFeatures
from dreamprm.bilevel.instance_weights import InstanceWeights
from dreamprm.bilevel.meta_optimizer import build_meta_optimizer
from dreamprm.config import (REPO_ROOT, TINY_MODEL, ConfigError, TrainConfig, load_ds_config, numerics_warnings,
                             resolve_ds_config)
from dreamprm.data.datasets import MetaDataset, TrainDataset
from dreamprm.data.packing import chain_units, group_chain_records, make_collator
from dreamprm.data.records import (DataValidationError, ImageChecker, MetaRecord, TrainRecord, load_meta_records,
                                   load_train_records)
from dreamprm.data.sampler import DistributedBatchSampler
from dreamprm.data.stream import BatchStream, StreamPosition
from dreamprm.distributed import engine as dist_engine
from dreamprm.distributed.engine import DistInfo, DistributedEngine
from dreamprm.model.loading import build_prm

TINY_MODEL_DIR = REPO_ROOT / "runs" / "tiny-qwen2vl"
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def deepspeed_config(config: TrainConfig, info: DistInfo) -> dict[str, Any]:
    """The DeepSpeed config with "auto" filled from the flags; refuses fd on 16-bit parameters."""
    run, bilevel = config.run, config.bilevel
    ds_config = resolve_ds_config(load_ds_config(run.deepspeed), config, world_size=info.world_size,
                                  on_gpu=info.device.type == "cuda", source=run.deepspeed)
    if bilevel.hypergrad == "fd" and not bilevel.baseline and config.optim.precision != "fp32":
        raise ConfigError(
            f"--hypergrad fd needs --precision fp32: with {config.optim.precision} parameters the perturbation "
            "εv is mostly rounded away (measured: 23-88% error at 2B). Use --hypergrad exact (the default, "
            "ε-free, accurate in bf16) or --hypergrad fd_bf16_naive to reproduce the original.")
    if info.rank == 0:  # before any model is loaded
        for line in numerics_warnings(config):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    return ds_config


def resolve_reward_model(name: str, rank: int) -> str:
    """'tiny' → the offline tiny Qwen2-VL, built once by rank 0 while the others wait."""
    if name != TINY_MODEL:
        return name
    if rank == 0 and not (TINY_MODEL_DIR / "config.json").is_file():
        from dreamprm.model.tiny import build_tiny_qwen2vl
        build_tiny_qwen2vl(TINY_MODEL_DIR)
    dist_engine.barrier()
    return str(TINY_MODEL_DIR)


@dataclass
class Records:
    train: list[TrainRecord]
    meta: list[MetaRecord]
    skipped: list[dict[str, Any]]  # --skip_invalid_records: {"file", "record", "reasons"} per record left out


# "FILE:record N: field: what is wrong" (or "FILE:line N: ..." in JSON Lines): a problem of one record.
RECORD_PROBLEM = re.compile(r"^(?P<file>.*?):(?P<unit>record|line) (?P<index>\d+): (?P<reason>.*)$")


def load_records(config: TrainConfig, info: DistInfo) -> Records:
    """Both record files validated completely, every problem reported at once; with
    --skip_invalid_records, records with problems are left out (and listed) instead."""
    problems: list[str] = []
    images = ImageChecker()
    data, b = config.data, config.bilevel
    train = load_train_records(data.train_json_file, data.image_root, problems=problems, images=images)
    meta = load_meta_records(data.meta_json_file, data.image_root, problems=problems, images=images)
    skipped: list[dict[str, Any]] = []
    if problems and data.skip_invalid_records:
        problems, skipped = split_record_problems(problems)
        left_out = {(s["file"], s["record"]) for s in skipped}
        train = [r for r in train if source_of(r.source) not in left_out]
        meta = [r for r in meta if source_of(r.source) not in left_out]
    if problems:
        raise DataValidationError(problems)
    global_batch = config.optim.batch_size * info.world_size
    if len(train) < global_batch:
        raise DataValidationError([f"{data.train_json_file}: file: {len(train)} records cannot fill one global "
                                   f"batch of {global_batch} (--batch_size x world size)"])
    meta_global = b.meta_batch_size * info.world_size
    if not b.baseline and b.meta_loss == "pairwise" and meta_global < 2:
        raise ConfigError("--meta_loss pairwise compares right with wrong meta chains, and one upper step sees "
                          f"{meta_global} chain (--meta_batch_size x world size): use --meta_batch_size 8 (the "
                          "default) or more, or --meta_loss mse")
    if not b.baseline and len(meta) < meta_global:
        raise DataValidationError([f"{data.meta_json_file}: file: {len(meta)} records cannot fill one meta batch "
                                   f"of {meta_global} (--meta_batch_size x world size)"])
    return Records(train, meta, skipped)


def source_of(source: str) -> tuple[str, int]:
    """A record's "FILE:record N" as (FILE, N)."""
    file, _, index = source.rpartition(":record ")
    return file, int(index)


def split_record_problems(problems: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """(problems of whole files, which stay fatal; the records to leave out, each with its reasons)."""
    fatal, by_record = [], {}
    for problem in problems:
        match = RECORD_PROBLEM.match(problem)
        if match is None:
            fatal.append(problem)
            continue
        key = (match["file"], int(match["index"]), match["unit"])
        by_record.setdefault(key, []).append(match["reason"])
    skipped = [{"file": file, unit: index, "reasons": reasons} for (file, index, unit), reasons in by_record.items()]
    return fatal, skipped


def reason_counts(skipped: list[dict[str, Any]]) -> dict[str, int]:
    """How many records each kind of problem left out ("field: what", without the record's values)."""
    counts: dict[str, int] = {}
    for record in skipped:
        stems = set()
        for reason in record["reasons"]:
            field, _, message = reason.partition(": ")
            stems.add(f"{field}: " + re.split(r" \(|, found |: | of ", message)[0])
        for stem in stems:
            counts[stem] = counts.get(stem, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def write_skipped_records(output: Path, skipped: list[dict[str, Any]], info: DistInfo) -> Path | None:
    """skipped_records.jsonl in the output folder (rank 0), and the counts per reason printed."""
    if not skipped or info.rank != 0:
        return None
    path = output / "skipped_records.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for record in skipped:
            f.write(json.dumps(record) + "\n")
    print(f"--skip_invalid_records: {len(skipped)} record(s) left out, listed with their reasons in {path}:",
          flush=True)
    for reason, count in reason_counts(skipped).items():
        print(f"  {count:6d}  {reason}", flush=True)
    return path


def prepare_output(config: TrainConfig, info: DistInfo) -> Path:
    """The output folder (the same on every rank), created and checked writable by rank 0."""
    path = config.run.weights_path or str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    path = Path(dist_engine.broadcast_object(path))
    problem = None
    if info.rank == 0:
        try:
            (path / "checkpoints").mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            problem = f"--weights_path {path}: not writable ({err.__class__.__name__}: {err})"
    problem = dist_engine.broadcast_object(problem)
    if problem:
        raise ConfigError(problem)
    config.run.weights_path = str(path)
    return path


def write_run_description(output: Path, config: TrainConfig, ds_config: dict[str, Any], domains: dict[str, int],
                          info: DistInfo) -> None:
    """config.json and domains.json (rank 0), once a resume (if any) has been accepted."""
    if info.rank == 0:
        (output / "config.json").write_text(json.dumps(
            {**config.to_dict(), "deepspeed_resolved": ds_config, "domains": domains, "world_size": info.world_size},
            indent=2, sort_keys=True))
        (output / "domains.json").write_text(json.dumps(domains, indent=2))


def engine(config: TrainConfig, ds_config: dict[str, Any], reward_model: str, info: DistInfo) -> DistributedEngine:
    """The PRM, partitioned as it loads, inside a DeepSpeed engine with AdamW and StepLR."""
    m, o = config.model, config.optim
    with dist_engine.partitioned_construction(ds_config):
        # Packed rows need a per-token attention mask: SDPA takes one on CPU and CUDA (flash
        # attention cannot); per-prefix rows keep the library's default.
        model = build_prm(reward_model, m.head, seed=config.run.seed, dtype=PRECISIONS[o.precision],
                          trust_remote_code=m.trust_remote_code, gradient_checkpointing=m.gradient_checkpointing,
                          attn_implementation="sdpa" if config.data.packing == "chain" else None)

    def step_lr(optimizer: torch.optim.Optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.scheduler_step_size, gamma=o.scheduler_gamma)

    return DistributedEngine(model, ds_config, info, upper_precision=config.bilevel.upper_precision, lr_scheduler=step_lr)


def upper_level(config: TrainConfig, domains: dict[str, int], train_records: list[TrainRecord]
                ) -> tuple[DomainWeights, InstanceWeights | InstanceNet | None, torch.optim.Optimizer]:
    """The domain weights, the instance weights (--weighting instance/both: a per-record table;
    instance_net/both_net: a net over record features) and the domain-logit optimiser."""
    b = config.bilevel
    domain_weights = DomainWeights(list(domains))
    instance_weights: InstanceWeights | InstanceNet | None = None
    if b.weighting in ("instance", "both") and not b.baseline:
        instance_weights = InstanceWeights(len(train_records), b.instance_lr, b.instance_recipe)
    elif b.weighting in ("instance_net", "both_net") and not b.baseline:
        names = tuple(x.strip() for x in b.instance_net_features.split(",") if x.strip())
        instance_weights = InstanceNet(RecordFeatures.from_records(train_records, domains), names,
                                       lr=b.instance_net_lr, seed=config.run.seed)
    optimizer = build_meta_optimizer(b.meta_optimizer, domain_weights.parameters(), lr=b.meta_lr,
                                     weight_decay=b.meta_weight_decay, beta=b.meta_beta)
    return domain_weights, instance_weights, optimizer


def batch_streams(config: TrainConfig, info: DistInfo, processor: Any, train_records: list[TrainRecord],
                  meta_records: list[MetaRecord], domains: dict[str, int], train_position: StreamPosition,
                  meta_position: StreamPosition) -> tuple[BatchStream, BatchStream | None]:
    """The training stream (ends after --max_epoch) and the meta stream (None for a vanilla PRM)."""
    d, o, b, run = config.data, config.optim, config.bilevel, config.run
    collator = make_collator(processor, d.packing)
    # Packing: the records of one chain that nest and share a batch are scored in one row;
    # --chain_batches also samples them together.
    groups = group_chain_records(train_records) if d.packing == "chain" else None
    train_set = TrainDataset(train_records, domains, d.max_image_side, groups=groups)
    loader_args = dict(collate_fn=collator, num_workers=d.num_workers, persistent_workers=False)
    sampler = DistributedBatchSampler(train_set.lengths(), o.batch_size, num_replicas=info.world_size,
                                      rank=info.rank, seed=run.seed,
                                      units=chain_units(groups) if groups and d.chain_batches else None)
    train = BatchStream(DataLoader(train_set, batch_sampler=sampler, **loader_args), sampler, train_position,
                        max_epochs=run.max_epoch)
    if b.baseline:  # a vanilla PRM never reads meta batches
        return train, None
    meta_set = MetaDataset(meta_records, d.max_image_side)
    sampler = DistributedBatchSampler(meta_set.lengths(), b.meta_batch_size, num_replicas=info.world_size,
                                      rank=info.rank, seed=run.seed + 1)
    return train, BatchStream(DataLoader(meta_set, batch_sampler=sampler, **loader_args), sampler, meta_position)
