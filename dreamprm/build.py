"""Building the trainer's parts from a config: each function makes one part and checks what it needs.

Called in this order by `Trainer.__init__`. The checks that can refuse a run ran before torch was
imported (`dreamprm.preflight`); what is checked here again (the DeepSpeed config against the real
device, the model folder) comes before anything is written.
"""
from __future__ import annotations

import json
import sys
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
                             precision_problem, resolve_ds_config)
from dreamprm.data.chat import chain_layout
from dreamprm.data.datasets import MetaDataset, TrainDataset
from dreamprm.data.packing import chain_units, group_chain_records, make_collator
from dreamprm.data.records import MetaRecord, TrainRecord
from dreamprm.data.sampler import DistributedBatchSampler
from dreamprm.data.stream import BatchStream, StreamPosition
from dreamprm.distributed import engine as dist_engine
from dreamprm.distributed.engine import DistInfo, DistributedEngine
from dreamprm.losses import META_LOSS_CHANCE
from dreamprm.model.loading import build_prm
from dreamprm.preflight import reason_counts

TINY_MODEL_DIR = REPO_ROOT / "runs" / "tiny-qwen2vl"
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def deepspeed_config(config: TrainConfig, info: DistInfo) -> dict[str, Any]:
    """The DeepSpeed config with "auto" filled from the flags; refuses fd on 16-bit parameters."""
    run, bilevel = config.run, config.bilevel
    ds_config = resolve_ds_config(load_ds_config(run.deepspeed), config, world_size=info.world_size,
                                  on_gpu=info.device.type == "cuda", source=run.deepspeed)
    problem = precision_problem(config)
    if problem:
        raise ConfigError(problem)
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


def prepare_output(config: TrainConfig, info: DistInfo) -> tuple[Path, list[Path]]:
    """The output folder (the same on every rank), created and checked writable by rank 0; returns it
    and the folders created here (`remove_created` takes them away again if the run is refused)."""
    path = config.run.weights_path or str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    path = Path(dist_engine.broadcast_object(path))
    problem, created = None, []
    if info.rank == 0:
        checkpoints = path / "checkpoints"
        created = [p for p in (checkpoints, *checkpoints.parents) if not p.exists()]
        try:
            checkpoints.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            problem = f"--weights_path {path}: not writable ({err.__class__.__name__}: {err})"
    problem = dist_engine.broadcast_object(problem)
    if problem:
        raise ConfigError(problem)
    config.run.weights_path = str(path)
    return path, created


def remove_created(created: list[Path]) -> None:
    """A refused run leaves nothing behind: the folders `prepare_output` made, innermost first, if still empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty (something else wrote there) or already gone: leave it
            return


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
                          attn_implementation="sdpa" if config.data.packing == "chain" else None,
                          judge_tokens=m.judge_tokens)

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
                                     weight_decay=b.meta_weight_decay, beta=b.meta_beta,
                                     chance=META_LOSS_CHANCE[b.meta_loss] if b.meta_evidence > 0 else None,
                                     confidence=b.meta_evidence)
    return domain_weights, instance_weights, optimizer


def collator(config: TrainConfig, processor: Any, adapter: Any = None) -> Any:
    """The run's collator: its --packing, the head's chat layout (generative: one step per turn) and the
    backbone's adapter (`dreamprm.model.adapters`, the PRM's ``.adapter``)."""
    return make_collator(processor, config.data.packing, chain_layout(config.model.head, config.model.judge_tokens),
                         adapter)


def batch_streams(config: TrainConfig, info: DistInfo, processor: Any, train_records: list[TrainRecord],
                  meta_records: list[MetaRecord], domains: dict[str, int], train_position: StreamPosition,
                  meta_position: StreamPosition, adapter: Any = None) -> tuple[BatchStream, BatchStream | None]:
    """The training stream (ends after --max_epoch) and the meta stream (None for a vanilla PRM);
    ``adapter``: the backbone's (`dreamprm.model.adapters`, the PRM's ``.adapter``)."""
    d, o, b, run = config.data, config.optim, config.bilevel, config.run
    collate = collator(config, processor, adapter)
    # Packing: the records of one chain that nest and share a batch are scored in one row;
    # --chain_batches also samples them together.
    groups = group_chain_records(train_records) if d.packing == "chain" else None
    train_set = TrainDataset(train_records, domains, d.max_image_side, groups=groups)
    loader_args = dict(collate_fn=collate, num_workers=d.num_workers, persistent_workers=False)
    sampler = DistributedBatchSampler(train_set.lengths(), o.batch_size, num_replicas=info.world_size,
                                      rank=info.rank, seed=run.seed,
                                      units=chain_units(groups) if groups and d.chain_batches else None)
    train = BatchStream(DataLoader(train_set, batch_sampler=sampler, **loader_args), sampler, train_position,
                        max_epochs=run.max_epoch)
    if b.baseline:  # a vanilla PRM never reads meta batches
        return train, None
    meta_set = MetaDataset(meta_records, d.max_image_side)
    # The chains of one question (meta records sharing `question_id`) go into one meta batch.
    questions = meta_set.question_units()
    sampler = DistributedBatchSampler(meta_set.lengths(), b.meta_batch_size, num_replicas=info.world_size,
                                      rank=info.rank, seed=run.seed + 1, units=questions,
                                      whole_units=questions is not None)
    return train, BatchStream(DataLoader(meta_set, batch_sampler=sampler, **loader_args), sampler, meta_position)
