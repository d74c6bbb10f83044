"""The DreamPRM trainer: builds the components, then runs segments until done.

    train()                     loop over segments; checkpoint, stop, finish
      train_segment()           `unroll_steps` lower steps, then one upper step
        lower_step()            `gradiant_accumulation` micro-batches → one PRM optimiser step
        upper.upper_step()      meta-gradient → hypergradient → domain-weight update

Every rank runs the same code; rank 0 alone writes logs, TensorBoard and summaries. Decisions that
must agree across ranks (skip a non-finite update, stop on a signal) are taken from one small
all-reduce per optimiser step.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from dreamprm.bilevel.domain_weights import DomainWeights
from dreamprm.bilevel.instance_weights import InstanceWeights
from dreamprm.bilevel.meta_optimizer import build_meta_optimizer
from dreamprm.bilevel.upper import UpperResult, model_inputs, upper_step
from dreamprm.checkpoint import (Checkpointer, CheckpointWriteError, checkpoint_name, complete_checkpoints,
                                 format_bytes)
from dreamprm.config import REPO_ROOT, TINY_MODEL, ConfigError, TrainConfig, load_ds_config, resolve_ds_config
from dreamprm.data.datasets import MetaDataset, TrainDataset
from dreamprm.data.packing import chain_units, group_chain_records, make_collator
from dreamprm.data.records import (DataValidationError, ImageChecker, MetaRecord, TrainRecord, domain_index,
                                   load_meta_records, load_train_records)
from dreamprm.data.sampler import DistributedBatchSampler
from dreamprm.distributed import engine as dist_engine
from dreamprm.distributed.engine import DistInfo, DistributedEngine
from dreamprm.losses import domain_loss_sums, per_sample_mse, weighted_training_loss
from dreamprm.metrics import MetricsLogger
from dreamprm.model.loading import build_prm, export_prm, resolve_model_dir
from dreamprm.model.processor import load_processor
from dreamprm.preemption import EXIT_PREEMPTED, StopRequest
from dreamprm.summary import write_domain_weight_summary, write_instance_weight_report

TINY_MODEL_DIR = REPO_ROOT / "runs" / "tiny-qwen2vl"


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. too many non-finite updates in a row); a checkpoint was written."""


@dataclass
class TrainState:
    """Everything besides the engine that a resumed run needs to continue the same trajectory."""
    step: int = 0
    upper_steps: int = 0
    train_epoch: int = 0
    train_batch: int = 0  # batches of train_epoch already consumed
    meta_epoch: int = 0
    meta_batch: int = 0
    bad_lower_in_a_row: int = 0
    bad_upper_in_a_row: int = 0
    skipped_lower: int = 0
    skipped_upper: int = 0
    samples: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Window:
    """Accumulators between two log lines (device tensors: no sync until logging)."""
    loss_sum: float = 0.0
    weighted_sum: float = 0.0
    domain_sums: torch.Tensor | None = None
    domain_counts: torch.Tensor | None = None
    samples: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


def resolve_reward_model(name: str, rank: int) -> str:
    """'tiny' → the offline tiny Qwen2-VL, built once by rank 0 while the others wait."""
    if name != TINY_MODEL:
        return name
    if rank == 0 and not (TINY_MODEL_DIR / "config.json").is_file():
        from dreamprm.model.tiny import build_tiny_qwen2vl
        build_tiny_qwen2vl(TINY_MODEL_DIR)
    dist_engine.barrier()
    return str(TINY_MODEL_DIR)


def parse_fault_plan(spec: str | None) -> dict[str, set[int]]:
    """'lower:5,6;upper:2' → {"lower": {5, 6}, "upper": {2}} (see --inject_nonfinite)."""
    plan: dict[str, set[int]] = {"lower": set(), "upper": set()}
    for part in filter(None, (spec or "").split(";")):
        level, _, steps = part.partition(":")
        if level not in plan or not steps:
            raise ConfigError(f"--inject_nonfinite: expected 'lower:N,N;upper:N', got {spec!r}")
        try:
            plan[level].update(int(s) for s in steps.split(","))
        except ValueError as err:
            raise ConfigError(f"--inject_nonfinite: {err}") from err
    return plan


class Trainer:
    # --- configuration
    config: TrainConfig
    ds_config: dict[str, Any]
    info: DistInfo
    domains: dict[str, int]
    output: Path
    # --- components
    engine: DistributedEngine
    domain_weights: DomainWeights
    instance_weights: InstanceWeights | None  # --weighting instance/both
    meta_optimizer: torch.optim.Optimizer
    train_sampler: DistributedBatchSampler
    meta_sampler: DistributedBatchSampler
    # --- runtime utilities
    logger: MetricsLogger
    checkpointer: Checkpointer
    # --- training state
    state: TrainState

    def __init__(self, config: TrainConfig, info: DistInfo, stop: StopRequest | None = None):
        self.config, self.info = config, info
        self.stop = stop or StopRequest()
        self.faults = parse_fault_plan(config.run.inject_nonfinite)
        run, bilevel = config.run, config.bilevel
        self.ds_config = resolve_ds_config(load_ds_config(run.deepspeed), config, world_size=info.world_size,
                                           on_gpu=info.device.type == "cuda", source=run.deepspeed)
        if bilevel.hypergrad == "fd" and not bilevel.baseline and config.optim.precision != "fp32":
            raise ConfigError(
                f"--hypergrad fd needs --precision fp32: with {config.optim.precision} parameters the perturbation "
                "εv is mostly rounded away (measured: 23-88% error at 2B). Use --hypergrad exact (the default, "
                "ε-free, accurate in bf16) or --hypergrad fd_bf16_naive to reproduce the original.")
        self.reward_model = resolve_model_dir(resolve_reward_model(config.model.reward_model, info.rank))
        train_records, meta_records = self._load_records()
        self.domains = domain_index(train_records)
        self.output = self._prepare_output()
        self.processor = load_processor(self.reward_model, trust_remote_code=config.model.trust_remote_code)
        self.engine = self._build_engine()
        self.domain_weights = DomainWeights(list(self.domains))
        self.train_records = train_records
        self.instance_weights = (InstanceWeights(len(train_records), bilevel.instance_lr)
                                 if bilevel.weighting != "domain" and not bilevel.baseline else None)
        self._record_domains = None if self.instance_weights is None else torch.tensor(
            [self.domains[r.domain] for r in train_records], dtype=torch.int32)  # for the histograms
        self.meta_optimizer = build_meta_optimizer(bilevel.meta_optimizer, self.domain_weights.parameters(),
                                                   lr=bilevel.meta_lr, weight_decay=bilevel.meta_weight_decay,
                                                   beta=bilevel.meta_beta)
        self._build_data(train_records, meta_records)
        self.state = TrainState()
        self._saved: tuple[int, Path] | None = None  # (step, folder) of the last checkpoint written
        self.checkpointer = Checkpointer(self.output / "checkpoints", self.engine, keep_last=run.keep_last)
        self._maybe_resume()
        self._write_run_description()
        self.logger = MetricsLogger(self.output, self.engine.is_main, run.iteration_num, self.state.step)
        self._logged_step = self.state.step

    # ------------------------------------------------------------------ construction
    def _load_records(self) -> tuple[list[TrainRecord], list[MetaRecord]]:
        """Validate both files completely before anything is written; all problems at once."""
        problems: list[str] = []
        images = ImageChecker()
        data = self.config.data
        train = load_train_records(data.train_json_file, data.image_root, problems=problems, images=images)
        meta = load_meta_records(data.meta_json_file, data.image_root, problems=problems, images=images)
        if problems:
            raise DataValidationError(problems)
        global_batch = self.config.optim.batch_size * self.info.world_size
        if len(train) < global_batch:
            raise DataValidationError([f"{data.train_json_file}: file: {len(train)} records cannot fill one global "
                                       f"batch of {global_batch} (--batch_size x world size)"])
        b = self.config.bilevel
        if not b.baseline and b.meta_loss == "pairwise" and b.meta_batch_size * self.info.world_size < 2:
            raise ConfigError("--meta_loss pairwise compares right with wrong meta chains, and one upper step sees "
                              f"{b.meta_batch_size * self.info.world_size} chain (--meta_batch_size x world size): "
                              "use --meta_batch_size 8 (the default) or more, or --meta_loss mse")
        if not self.config.bilevel.baseline and len(meta) < self.config.bilevel.meta_batch_size * self.info.world_size:
            raise DataValidationError([f"{data.meta_json_file}: file: {len(meta)} records cannot fill one meta batch "
                                       f"of {self.config.bilevel.meta_batch_size * self.info.world_size} "
                                       "(--meta_batch_size x world size)"])
        return train, meta

    def _prepare_output(self) -> Path:
        path = self.config.run.weights_path or str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
        path = Path(dist_engine.broadcast_object(path))
        problem = None
        if self.info.rank == 0:
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
        self.config.run.weights_path = str(path)
        return path

    def _write_run_description(self) -> None:
        """config.json and domains.json: written once a resume (if any) has been accepted."""
        if self.info.rank == 0:
            (self.output / "config.json").write_text(json.dumps(
                {**self.config.to_dict(), "deepspeed_resolved": self.ds_config, "domains": self.domains,
                 "world_size": self.info.world_size}, indent=2, sort_keys=True))
            (self.output / "domains.json").write_text(json.dumps(self.domains, indent=2))

    def _build_engine(self) -> DistributedEngine:
        m, o = self.config.model, self.config.optim
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[o.precision]
        with dist_engine.partitioned_construction(self.ds_config):
            # Packed rows need a per-token attention mask: SDPA takes one on CPU and CUDA (flash
            # attention cannot); per-prefix rows keep the library's default.
            model = build_prm(self.reward_model, m.head, seed=self.config.run.seed, dtype=dtype,
                              trust_remote_code=m.trust_remote_code, gradient_checkpointing=m.gradient_checkpointing,
                              attn_implementation="sdpa" if self.config.data.packing == "chain" else None)

        def step_lr(optimizer: torch.optim.Optimizer):
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.scheduler_step_size, gamma=o.scheduler_gamma)

        return DistributedEngine(model, self.ds_config, self.info, lr_scheduler=step_lr)

    def _build_data(self, train_records, meta_records) -> None:
        d, o, b, run = self.config.data, self.config.optim, self.config.bilevel, self.config.run
        collator = make_collator(self.processor, d.packing)
        # Packing: the records of one chain that nest and share a batch are scored in one row;
        # --chain_batches also samples them together.
        groups = group_chain_records(train_records) if d.packing == "chain" else None
        train_set = TrainDataset(train_records, self.domains, d.max_image_side, groups=groups)
        meta_set = MetaDataset(meta_records, d.max_image_side)
        self.train_sampler = DistributedBatchSampler(train_set.lengths(), o.batch_size, num_replicas=self.info.world_size,
                                                     rank=self.info.rank, seed=run.seed,
                                                     units=chain_units(groups) if groups and d.chain_batches else None)
        loader_args = dict(collate_fn=collator, num_workers=d.num_workers, persistent_workers=False)
        self.train_loader = DataLoader(train_set, batch_sampler=self.train_sampler, **loader_args)
        if not b.baseline:  # a vanilla PRM never reads meta batches
            self.meta_sampler = DistributedBatchSampler(meta_set.lengths(), b.meta_batch_size,
                                                        num_replicas=self.info.world_size, rank=self.info.rank,
                                                        seed=run.seed + 1)
            self.meta_loader = DataLoader(meta_set, batch_sampler=self.meta_sampler, **loader_args)
        self._train_iter: Iterator | None = None
        self._meta_iter: Iterator | None = None

    def _maybe_resume(self) -> None:
        resume = self.config.run.resume
        if not resume:
            return
        if resume == "auto":
            for partial, size in self.checkpointer.remove_partial():
                print(f"resume: removed {partial} ({format_bytes(size)}), left by a save that did not finish",
                      flush=True)
            found = complete_checkpoints(self.output / "checkpoints")
            if not found:
                return
            folder = found[-1]
        else:
            folder = Path(resume)
        trainer_state = self.checkpointer.load(folder, check=self._check_compatible)
        if folder.parent.resolve() == self.checkpointer.root.resolve():
            # A save at this same step (nothing trained since) keeps this checkpoint instead of rewriting it.
            self._saved = (trainer_state["state"]["step"], folder)
        self.state = TrainState(**trainer_state["state"])
        self.domain_weights.load_state_dict(trainer_state["domain_weights"])
        if self.instance_weights is not None:
            if "instance_weights" in trainer_state:
                self.instance_weights.load_state_dict(trainer_state["instance_weights"])
            elif self.engine.is_main:  # e.g. branched from a vanilla warm-up
                print(f"resume: {folder} holds no instance weights; every record starts at weight 1", flush=True)
        # Another optimiser's state does not fit this one (a run branched from a checkpoint may choose
        # its own): it starts fresh. Checkpoints without the kind say it through their hyperparameters.
        groups = trainer_state["meta_optimizer"]["param_groups"]
        saved_kind = trainer_state.get("meta_optimizer_kind") or (
            "adamw" if "betas" in groups[0] else "gated" if "beta" in groups[0] else "sgd")
        same_kind = saved_kind == self.config.bilevel.meta_optimizer
        if same_kind:
            self.meta_optimizer.load_state_dict(trainer_state["meta_optimizer"])
        changes = self._apply_configured_hyperparameters()
        if self.engine.is_main:
            print(f"resumed from {folder} at step {self.state.step}", flush=True)
            if not same_kind:
                print(f"resume: --meta_optimizer {self.config.bilevel.meta_optimizer} starts with a fresh state (the "
                      f"checkpoint's domain-logit optimiser was {saved_kind}); the domain weights are kept", flush=True)
            for name, (saved, now) in changes.items():
                print(f"resume: --{name} {now:g} replaces the checkpoint's {saved:g}", flush=True)

    def _apply_configured_hyperparameters(self) -> dict[str, tuple[float, float]]:
        """Loading optimiser state also loads its learning rate and weight decay; the flags of this run
        win (a run branched from another's checkpoint, e.g. DreamPRM after a vanilla warm-up, must
        use its own --meta_lr). Returns {flag: (checkpoint value, configured value)} for what changed."""
        o, b = self.config.optim, self.config.bilevel
        changes = self.engine.override_hyperparameters(o.lr, o.weight_decay)
        for group in self.meta_optimizer.param_groups:
            for key, flag, value in (("lr", "meta_lr", b.meta_lr), ("weight_decay", "meta_weight_decay",
                                                                    b.meta_weight_decay), ("beta", "meta_beta", b.meta_beta)):
                if key in group and group[key] != value:
                    changes[flag] = (group[key], value)
                    group[key] = value
        return changes

    def _check_compatible(self, folder: Path, saved: dict[str, Any]) -> None:
        differences = []
        if saved["domains"] != self.domains:
            differences.append(f"domains: checkpoint {saved['domains']} vs data {self.domains}")
        table = saved.get("instance_weights")
        if self.instance_weights is not None and table is not None and table["logits"].numel() != len(self.train_records):
            differences.append(f"instance weights: checkpoint {table['logits'].numel()} records vs "
                               f"{len(self.train_records)} in {self.config.data.train_json_file}")
        # Model directories are recorded absolute; older checkpoints may hold a relative spelling.
        then = {**saved["identity"], "reward_model": os.path.abspath(saved["identity"]["reward_model"])}
        for key, now in self._identity().items():
            if then[key] != now:
                differences.append(f"{key}: checkpoint {saved['identity'][key]!r} vs now {now!r}")
        if differences:
            raise ConfigError(f"--resume {folder}: the checkpoint belongs to a different run: " + "; ".join(differences))

    def _trainer_state(self) -> dict[str, Any]:
        state = {"state": self.state.as_dict(), "domains": self.domains,
                 "domain_weights": self.domain_weights.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                 "meta_optimizer_kind": self.config.bilevel.meta_optimizer, "identity": self._identity()}
        if self.instance_weights is not None:
            state["instance_weights"] = self.instance_weights.state_dict()
        return state

    def _identity(self) -> dict[str, str]:
        """What a checkpoint must share with the run that resumes it (besides the domains)."""
        return {"reward_model": self.reward_model, "head": self.config.model.head}

    # ------------------------------------------------------------------ data
    def next_train_batch(self) -> dict[str, torch.Tensor] | None:
        """The next local micro-batch, or None when --max_epoch is reached."""
        s = self.state
        while True:
            if self._train_iter is None:
                if s.train_epoch >= self.config.run.max_epoch:
                    return None
                self.train_sampler.set_position(s.train_epoch, s.train_batch)
                self._train_iter = iter(self.train_loader)
            batch = next(self._train_iter, None)
            if batch is not None:
                s.train_batch += 1
                return batch
            self._train_iter = None
            s.train_epoch, s.train_batch = s.train_epoch + 1, 0

    def next_meta_batch(self) -> dict[str, torch.Tensor]:
        s = self.state
        while True:
            if self._meta_iter is None:
                self.meta_sampler.set_position(s.meta_epoch, s.meta_batch)
                self._meta_iter = iter(self.meta_loader)
            batch = next(self._meta_iter, None)
            if batch is not None:
                s.meta_batch += 1
                return batch
            self._meta_iter = None
            s.meta_epoch, s.meta_batch = s.meta_epoch + 1, 0

    # ------------------------------------------------------------------ training
    def train(self) -> int:
        """Run to --iteration_num / --max_epoch; returns the process exit code."""
        run = self.config.run
        self.logger.info(f"training {len(self.domains)} domains {list(self.domains)} on {self.info.world_size} rank(s); "
                         f"output in {self.output}")
        window = Window()
        finished = False
        while not finished:
            finished, stop = self.train_segment(window)
            if stop is not None:
                self.save_checkpoint()
                self.logger.info(f"{self.stop.name or 'signal'}: checkpoint written at step {self.state.step}; exiting "
                                 f"with code {EXIT_PREEMPTED} so that the job is requeued")
                self.logger.close()
                return EXIT_PREEMPTED
        self.save_checkpoint(final=True)
        self.finish()
        return 0

    def train_segment(self, window: Window) -> tuple[bool, int | None]:
        """Lower steps up to the next multiple of `unroll_steps`, then one upper step.

        Segments end at multiples of --unroll_steps, so a run resumed mid-segment completes that
        segment first and follows the uninterrupted trajectory exactly. A checkpoint due at a
        segment's end is written after its upper step. Returns (finished, stop signal).
        """
        run, bilevel = self.config.run, self.config.bilevel
        remaining = bilevel.unroll_steps - self.state.step % bilevel.unroll_steps
        segment_batches: list[dict[str, torch.Tensor]] = []
        for i in range(remaining):
            if self.state.step >= run.iteration_num:
                return True, None
            result = self.lower_step(window)
            if result is None:
                return True, None
            step_batches, stop = result
            segment_batches = segment_batches + step_batches if bilevel.hypergrad_batches == "segment" else step_batches
            if i < remaining - 1:
                if self.state.step % run.save_every_iterations == 0:
                    self.save_checkpoint()
                if stop is not None:
                    return False, stop
        if not bilevel.baseline:
            # A segment resumed mid-way holds only the batches seen since the resume.
            self.run_upper_step(segment_batches if bilevel.hypergrad_batches == "segment" else segment_batches[-1:])
        if self.state.step % run.save_every_iterations == 0:
            self.save_checkpoint()
        finished = self.state.step >= run.iteration_num
        return finished, None if finished else stop

    def lower_step(self, window: Window) -> tuple[list[dict[str, torch.Tensor]], int | None] | None:
        """One PRM optimiser step over `gradiant_accumulation` micro-batches with the current weights.

        Returns (its micro-batches, stop signal or None), or None when the data is exhausted.
        """
        weights = self.domain_weights().detach().float().to(self.info.device)
        nonfinite = torch.zeros((), device=self.info.device)
        micro_batches = []
        for _ in range(self.engine.module_engine.gradient_accumulation_steps()):
            cpu_batch = self.next_train_batch()
            if cpu_batch is None:
                return None
            batch = self.engine.to_device(cpu_batch)
            logits = self.engine.forward(model_inputs(batch))
            if self.info.rank == 0 and self.state.step + 1 in self.faults["lower"]:
                logits = logits * float("nan")
            per_sample = per_sample_mse(logits, batch["target"])
            instance = None if self.instance_weights is None else self.instance_weights.weights(batch["record"])
            loss = weighted_training_loss(per_sample, batch["domain"], weights, instance)
            nonfinite += (~torch.isfinite(loss)).float()
            boundary = self.engine.is_accumulation_boundary()
            if boundary:
                # One all-reduce per optimiser step decides for every rank: skip a non-finite
                # update, and stop on a signal that reached any rank.
                flags = self.engine.all_reduce_max(
                    torch.stack([nonfinite, torch.tensor(float(self.stop.signum or 0), device=self.info.device)]))
            self.engine.backward(torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0))
            if not boundary:
                self.engine.step()  # DeepSpeed counts micro-batches in step(); no update happens here
            micro_batches.append((batch, per_sample, loss))
        self.state.step += 1
        skip, stop = flags.tolist()  # the one host sync of a step
        if skip > 0:
            self.engine.skip_step()
            self._count_bad("lower")
        else:
            self.engine.step()
            self.state.bad_lower_in_a_row = 0
            for batch, per_sample, loss in micro_batches:
                self._accumulate(window, batch, per_sample, loss)
        if self.state.step % self.config.run.log_every == 0:
            self.log_window(window)
        return [batch for batch, _, _ in micro_batches], int(stop) or None

    def run_upper_step(self, train_batches: list[dict[str, torch.Tensor]]) -> None:
        b = self.config.bilevel
        started = time.perf_counter()
        meta_batch = self.engine.to_device(self.next_meta_batch())
        inject = self.info.rank == 0 and self.state.upper_steps + 1 in self.faults["upper"]
        result = upper_step(self.engine, self.domain_weights, self.meta_optimizer, meta_batch, train_batches,
                            method=b.hypergrad, radius=b.fd_radius, aggregation=b.aggregation, objective=b.meta_loss,
                            geometry=b.hypergrad_geometry, meta_loss_scale=float("nan") if inject else 1.0,
                            instance_weights=self.instance_weights, update_domains=b.weighting != "instance")
        seconds = time.perf_counter() - started  # synchronised: the result came through all-reduces
        self.state.upper_steps += 1
        if result.applied:
            self.state.bad_upper_in_a_row = 0
        else:
            self._count_bad("upper")
        if self.state.upper_steps % b.weight_check_every == 0:
            self.check_replicated_weights()
        self.log_upper(result, seconds)

    def _count_bad(self, level: str) -> None:
        """Count a skipped update; too many in a row stop the run with a checkpoint of the last good state."""
        s = self.state
        if level == "lower":
            s.skipped_lower += 1
            s.bad_lower_in_a_row += 1
            in_a_row = s.bad_lower_in_a_row
        else:
            s.skipped_upper += 1
            s.bad_upper_in_a_row += 1
            in_a_row = s.bad_upper_in_a_row
        where = f"step {s.step}" if level == "lower" else f"upper step {s.upper_steps} (after step {s.step})"
        self.logger.info(f"{where}: non-finite {level}-level loss or hypergradient; update skipped on every rank "
                         f"({in_a_row} in a row)")
        self.logger.scalars(s.step, {"faults/skipped_lower": s.skipped_lower, "faults/skipped_upper": s.skipped_upper})
        if in_a_row >= self.config.run.max_bad_steps:
            folder = self.save_checkpoint()
            raise TrainingAborted(f"{in_a_row} non-finite {level}-level updates in a row at step {s.step} "
                                  f"(--max_bad_steps {self.config.run.max_bad_steps}); nothing non-finite was applied "
                                  f"and the last good state is saved in {folder}")

    def check_replicated_weights(self) -> None:
        checksums = {"domain": self.domain_weights.checksum()}
        if self.instance_weights is not None:
            checksums["instance"] = self.instance_weights.checksum()
        values = torch.stack(list(checksums.values())).double()
        both = self.engine.all_reduce_max(torch.cat([values, -values]).to(self.info.device)).cpu()
        k = len(checksums)
        for i, name in enumerate(checksums):
            if float(both[i]) != -float(both[k + i]):
                raise RuntimeError(f"{name} weights differ across ranks at step {self.state.step} (checksums range "
                                   f"{-float(both[k + i])} .. {float(both[i])}); replicated state is corrupt")

    # ------------------------------------------------------------------ logging
    def _accumulate(self, window: Window, batch, per_sample: torch.Tensor, loss: torch.Tensor) -> None:
        k = len(self.domains)
        sums = domain_loss_sums(per_sample.detach(), batch["domain"], k)
        counts = torch.zeros(k, device=sums.device).index_add(0, batch["domain"], torch.ones_like(per_sample))
        window.domain_sums = sums if window.domain_sums is None else window.domain_sums + sums
        window.domain_counts = counts if window.domain_counts is None else window.domain_counts + counts
        window.loss_sum = window.loss_sum + per_sample.detach().sum()
        window.weighted_sum = window.weighted_sum + loss.detach() * per_sample.numel()
        window.samples += per_sample.numel()
        window.tokens += int(batch["attention_mask"].sum())
        self.state.samples += per_sample.numel() * self.info.world_size

    def log_window(self, window: Window) -> None:
        if window.domain_sums is None:
            return
        # One all-reduce of everything the log line needs; this is the sync point of logging.
        packed = torch.cat([window.domain_sums.double(), window.domain_counts.double(),
                            torch.stack([torch.as_tensor(window.loss_sum).double().to(self.info.device),
                                         torch.as_tensor(window.weighted_sum).double().to(self.info.device),
                                         torch.tensor(float(window.samples), dtype=torch.float64, device=self.info.device),
                                         torch.tensor(float(window.tokens), dtype=torch.float64, device=self.info.device)])])
        packed = self.engine.all_reduce_sum(packed).cpu()
        k = len(self.domains)
        sums, counts, (loss_sum, weighted_sum, samples, tokens) = packed[:k], packed[k:2 * k], packed[2 * k:].tolist()
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        values = {"train/loss": loss_sum / samples, "train/weighted_loss": weighted_sum / samples,
                  "train/lr": self.engine.learning_rate(), "perf/samples_per_s": samples / elapsed,
                  "perf/tokens_per_s": tokens / elapsed}
        if self.info.device.type == "cuda":
            values["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.info.device) / 2**30
        for name, i in self.domains.items():
            if counts[i] > 0:
                values[f"domain_loss/{name}"] = float(sums[i] / counts[i])
        self.logger.scalars(self.state.step, values)
        self.logger.progress(self.state.step - self._logged_step, loss=values["train/loss"],
                             samples_s=values["perf/samples_per_s"])
        self._logged_step = self.state.step
        window.__init__()

    def log_upper(self, result: UpperResult, seconds: float) -> None:
        step = self.state.step
        values = {"meta/loss": result.meta_loss, "meta/v_norm": result.v_norm, "perf/upper_step_s": seconds,
                  "hypergrad/norm": float(result.hypergradient.norm())}
        if result.epsilon is not None:
            values["hypergrad/epsilon"] = result.epsilon
        for name, i in self.domains.items():
            values[f"hypergrad/{name}"] = float(result.hypergradient[i])
        for name, w in self.domain_weights.as_dict().items():
            values[f"domain_weight/{name}"] = w
        if result.instance is not None:
            values["instance/rows_updated"] = result.instance["rows"]
            values["instance/hypergrad_rms"] = result.instance["rms"]
        gate = self.meta_optimizer.state.get(self.domain_weights.logits, {}).get("gate")
        if gate is not None:  # --meta_optimizer gated: how far each domain's signal stands out from noise
            for name, i in self.domains.items():
                values[f"meta_gate/{name}"] = float(gate[i])
        self.logger.scalars(step, values)

    # ------------------------------------------------------------------ checkpoint and end
    def save_checkpoint(self, final: bool = False) -> Path:
        """Checkpoint the current step (once: a second call at the same step returns the same folder).
        `final`: the run's last checkpoint, which retention never deletes. Raises CheckpointWriteError
        on every rank together when it cannot be written."""
        if self._saved is None or self._saved[0] != self.state.step:
            try:
                folder = self.checkpointer.save(self.state.step, self._trainer_state(), final=final)
            except CheckpointWriteError:
                self.logger.close()  # ends the progress bar's line: the error message starts on its own
                raise
            self._saved = (self.state.step, folder)
            self.log_instance_histograms()
            self.logger.flush()
        elif final:
            self.checkpointer.mark_final(self._saved[1])
        return self._saved[1]

    def log_instance_histograms(self) -> None:
        """TensorBoard histograms of the instance weights, one per domain (O(records): at checkpoints)."""
        if self.instance_weights is None or not self.engine.is_main:
            return
        weights = self.instance_weights.all_weights()
        self.logger.histograms(self.state.step, {f"instance_weight/{name}": weights[self._record_domains == i]
                                                 for name, i in self.domains.items()})

    def finish(self) -> None:
        """Domain-weight summary, the instance-weight report and the exported PRM."""
        weights = self.domain_weights.as_dict()
        if self.engine.is_main:
            write_domain_weight_summary(self.output, weights, self.domain_weights.logits.detach().tolist())
            if self.instance_weights is not None:
                path = write_instance_weight_report(self.output, self.config.data.train_json_file, self.train_records,
                                                    self.instance_weights.all_weights().tolist())
                self.logger.info(f"instance weights of {len(self.train_records)} records, lowest first: {path}")
        if self.config.run.export:
            state_dict = self.engine.consolidated_state_dict()
            if self.engine.is_main:
                meta = {"base_model": self.reward_model, "domains": self.domains, "domain_weights": weights,
                        "weighting": self.config.bilevel.weighting,
                        "aggregation": self.config.bilevel.aggregation, "step": self.state.step,
                        "max_image_side": self.config.data.max_image_side}
                export_prm(self.output / "export", state_dict, self.engine.module, self.processor, meta)
        self.logger.info(f"done at step {self.state.step}; domain weights: "
                         + ", ".join(f"{k}={v:.3f}" for k, v in weights.items()))
        self.logger.close()
