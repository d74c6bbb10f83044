"""The DreamPRM trainer: the loop, top to bottom (its parts are built in `dreamprm.build`).

    train()                     loop over segments; checkpoint, stop, finish
      train_segment()           `unroll_steps` lower steps, then one upper step
        lower_step()            `gradiant_accumulation` micro-batches → one PRM optimiser step
        run_upper_step()        `bilevel.upper.upper_step`: meta-gradient → hypergradient → weight update

Every rank runs the same code; rank 0 alone writes logs, TensorBoard and summaries. Decisions that
must agree across ranks (skip a non-finite update, stop on a signal) are taken from one small
all-reduce per optimiser step.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreamprm import build
from dreamprm.bilevel.upper import UpperResult, upper_step
from dreamprm.checkpoint import Checkpointer, CheckpointWriteError, complete_checkpoints, format_bytes
from dreamprm.config import ConfigError, TrainConfig
from dreamprm.data.records import DataValidationError, domain_index
from dreamprm.data.stream import StreamPosition
from dreamprm.distributed.collectives import gather_object
from dreamprm.distributed.engine import DistInfo
from dreamprm.evaluation import Evaluator, describe, is_better, load_eval_questions, within_share
from dreamprm.losses import META_LOSS_CHANCE, lower_loss, weighted_training_loss
from dreamprm.metrics import MetricsLogger, MetricWindow
from dreamprm.model.loading import check_backbone, export_prm, resolve_model_dir
from dreamprm.model.prm import model_inputs
from dreamprm.model.processor import load_processor
from dreamprm.preemption import EXIT_PREEMPTED, StopRequest
from dreamprm.preflight import Records, load_records
from dreamprm.summary import (MetaTrace, RunSummary, write_domain_weight_summary, write_instance_weight_report,
                              write_run_summary)
from dreamprm.trackers import open_trackers, require_extras


# Upper steps without signal that make the trainer warn, once they are also half of the upper steps.
MIN_SILENT_STEPS = 4


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. too many non-finite updates in a row); a checkpoint was written."""


@dataclass
class TrainState:
    """Everything besides the engine that a resumed run needs to continue the same trajectory."""
    step: int = 0
    upper_steps: int = 0
    train: StreamPosition = field(default_factory=StreamPosition)
    meta: StreamPosition = field(default_factory=StreamPosition)
    # Where the current segment's first training batch was read: a run resumed mid-segment reads the
    # segment's earlier batches again from here, so that its upper step differentiates the same batches.
    segment_train: StreamPosition | None = field(default_factory=StreamPosition)
    bad_lower_in_a_row: int = 0
    bad_upper_in_a_row: int = 0
    skipped_lower: int = 0
    skipped_upper: int = 0
    samples: int = 0

    def as_dict(self) -> dict[str, int]:
        """Flat, as checkpoints hold it (train_epoch, train_batch, meta_epoch, meta_batch, segment_train_epoch, ...)."""
        flat = {k: v for k, v in self.__dict__.items() if k not in _POSITIONS}
        for name in _POSITIONS:
            position = getattr(self, name)
            if position is not None:
                flat.update({f"{name}_epoch": position.epoch, f"{name}_batch": position.batch})
        return flat

    @classmethod
    def from_dict(cls, flat: dict[str, int]) -> "TrainState":
        flat = dict(flat)
        # Checkpoints written before segment_train was kept have none (a resume then warns).
        positions = {name: StreamPosition(flat.pop(f"{name}_epoch"), flat.pop(f"{name}_batch"))
                     if f"{name}_epoch" in flat else None for name in _POSITIONS}
        return cls(**flat, **positions)


_POSITIONS = ("train", "meta", "segment_train")


class Trainer:
    def __init__(self, config: TrainConfig, info: DistInfo, stop: StopRequest | None = None,
                 records: Records | None = None):
        """`records`: those `dreamprm.preflight.check_training` loaded and checked (else loaded here)."""
        self.config, self.info = config, info
        self.stop = stop or StopRequest()
        self.ds_config = build.deepspeed_config(config, info)
        self.reward_model = resolve_model_dir(build.resolve_reward_model(config.model.reward_model, info.rank))
        # A backbone without an adapter, or judgement tokens its tokenizer splits: refused before any output.
        check_backbone(self.reward_model, config.model.head, config.model.judge_tokens, config.model.trust_remote_code)
        records = records or load_records(config, info.world_size)
        self.train_records = records.train
        self.domains = domain_index(self.train_records)
        w = config.watch
        require_extras(w.trackers)
        eval_questions = load_eval_questions(w.eval_candidates, w.eval_image_root, w.keep_best) \
            if w.eval_candidates else None
        self.output, created = build.prepare_output(config, info)
        try:
            self._build(records, eval_questions)
        except (ConfigError, DataValidationError):
            if info.rank == 0:  # e.g. a refused resume: no empty checkpoints/ left behind
                build.remove_created(created)
            raise

    def _build(self, records: Records, eval_questions: Any) -> None:
        config, info, w = self.config, self.info, self.config.watch
        build.write_skipped_records(self.output, records.skipped, info)
        self.processor = load_processor(self.reward_model, trust_remote_code=config.model.trust_remote_code)
        self.engine = build.engine(config, self.ds_config, self.reward_model, info)
        self.evaluator = None if eval_questions is None else Evaluator(
            eval_questions, build.collator(config, self.processor, self.engine.module.adapter), batch_size=w.eval_batch_size,
            max_image_side=config.data.max_image_side, aggregation=config.bilevel.aggregation, rank=info.rank,
            world_size=info.world_size, gather=gather_object)
        self.last_eval: tuple[int, dict[str, float]] | None = None  # (step, metrics)
        self.eval_seconds = 0.0
        self.lower_loss = lower_loss(config.model.head, config.model.generative_loss)
        self.domain_weights, self.instance_weights, self.meta_optimizer = build.upper_level(
            config, self.domains, self.train_records)
        self.state = TrainState()
        self.train_batches, self.meta_batches = build.batch_streams(
            config, info, self.processor, self.train_records, records.meta, self.domains, self.state.train,
            self.state.meta, adapter=self.engine.module.adapter)
        self._saved: tuple[int, Path] | None = None  # (step, folder) of the last checkpoint written
        self._resumed_segment: list[dict[str, torch.Tensor]] = []  # see _reread_segment
        self.checkpointer = Checkpointer(self.output / "checkpoints", self.engine, keep_last=config.run.keep_last)
        self._maybe_resume()
        build.write_run_description(self.output, config, self.ds_config, self.domains, info)
        self.logger = MetricsLogger(self.output, self.engine.is_main, config.run.iteration_num, self.state.step,
                                    trackers=lambda: open_trackers(
                                        w.trackers, self.output, run_name=self.output.name, config=config.to_dict(),
                                        project=w.wandb_project, mlflow_uri=w.mlflow_tracking_uri))
        self.window = MetricWindow(len(self.domains), info.device)
        self.record_domains = None if self.instance_weights is None else torch.tensor(
            [self.domains[r.domain] for r in self.train_records], dtype=torch.int32)  # for the histograms
        self._logged_step = self.state.step
        self._never_seen: torch.Tensor | None = None  # domains whose d_k was 0 in every upper step so far
        self._no_signal = 0  # upper steps whose directional derivatives were all exactly 0
        b = config.bilevel
        self.meta_trace = None if b.baseline else MetaTrace(b.meta_loss, META_LOSS_CHANCE[b.meta_loss])
        self._warned_no_signal = False

    # ------------------------------------------------------------------ resume
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
        self.state = TrainState.from_dict(trainer_state["state"])
        self._resumed_segment = self._reread_segment(folder)
        self.train_batches.reposition(self.state.train)
        if self.meta_batches is not None:
            self.meta_batches.reposition(self.state.meta)
        self.domain_weights.load_state_dict(trainer_state["domain_weights"])
        self._resume_best(trainer_state.get("best"))
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

    def _reread_segment(self, folder: Path) -> list[dict[str, torch.Tensor]]:
        """The training batches of the segment a checkpoint stopped in, read again from the segment's start.

        With --hypergrad_batches segment the upper step differentiates every batch of its segment; a run
        resumed mid-segment reads the earlier ones again (the same sampler positions give the same batches)
        so that it follows the uninterrupted trajectory exactly."""
        state, unroll = self.state, self.config.bilevel.unroll_steps
        done_in_segment = state.step % unroll
        if done_in_segment == 0 or self.config.bilevel.hypergrad_batches != "segment" or self.config.bilevel.baseline:
            return []
        if state.segment_train is None:
            if self.engine.is_main:
                print(f"resume: {folder} was written mid-segment by an older version that did not keep the "
                      f"segment's start; the upper step at step {state.step - done_in_segment + unroll} sees only "
                      f"the batches read after the resume", flush=True)
            return []
        self.train_batches.reposition(StreamPosition(state.segment_train.epoch, state.segment_train.batch))
        count = done_in_segment * self.engine.gradient_accumulation_steps()
        rng = torch.get_rng_state()  # a DataLoader iterator draws its seed: the re-read leaves no trace
        batches = [self.train_batches.next() for _ in range(count)]
        torch.set_rng_state(rng)
        reached = self.train_batches.position
        if any(b is None for b in batches) or (reached.epoch, reached.batch) != (state.train.epoch, state.train.batch):
            raise ConfigError(f"{folder}/trainer_state.pt: field state: reading the segment's {count} batches again "
                              f"from {state.segment_train} ended at {reached}, not at the saved position "
                              f"{state.train}; was the training data (--train_json_file) changed?")
        return [self.engine.to_device(b) for b in batches]

    def _resume_best(self, best: dict[str, Any] | None) -> None:
        """The record of the best checkpoint travels in the trainer state; a different --keep_best starts afresh."""
        if best is None or best["metric"] != self.config.watch.keep_best:
            return
        self.checkpointer.set_best(best["metric"], best["value"], best["step"])
        if self.engine.is_main:
            gone = "; that checkpoint is gone, its value still has to be beaten" \
                if self.checkpointer.best_folder() is None else ""
            print(f"resume: best {best['metric']} so far {best['value']:.4f} at step {best['step']} "
                  f"({best['folder']}){gone}", flush=True)

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
        problem = None if self.instance_weights is None or table is None else self.instance_weights.incompatibility(table)
        if problem:
            differences.append(f"{problem} ({self.config.data.train_json_file})")
        # Model directories are recorded absolute; older checkpoints may hold a relative spelling.
        then = {**saved["identity"], "reward_model": os.path.abspath(saved["identity"]["reward_model"])}
        for key, now in self._identity().items():
            if then.get(key) != now:
                differences.append(f"{key}: checkpoint {saved['identity'][key]!r} vs now {now!r}")
        if differences:
            raise ConfigError(f"--resume {folder}: the checkpoint belongs to a different run: " + "; ".join(differences))

    def _trainer_state(self) -> dict[str, Any]:
        state = {"state": self.state.as_dict(), "domains": self.domains,
                 "domain_weights": self.domain_weights.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict(),
                 "meta_optimizer_kind": self.config.bilevel.meta_optimizer, "identity": self._identity(),
                 "best": self.checkpointer.best}
        if self.instance_weights is not None:
            state["instance_weights"] = self.instance_weights.state_dict()
        return state

    def _identity(self) -> dict[str, str]:
        """What a checkpoint must share with the run that resumes it (besides the domains)."""
        m = self.config.model
        judge = {"judge_tokens": m.judge_tokens} if m.head == "generative" else {}
        return {"reward_model": self.reward_model, "head": m.head, **judge}

    # ------------------------------------------------------------------ training
    def train(self) -> int:
        """Run to --iteration_num / --max_epoch; returns the process exit code."""
        self.logger.info(f"training {len(self.domains)} domains {list(self.domains)} on {self.info.world_size} rank(s); "
                         f"output in {self.output}")
        self._started, self._started_samples = time.perf_counter(), self.state.samples
        finished = False
        while not finished:
            finished, stop = self.train_segment()
            if stop is not None:
                self.save_checkpoint()
                self.logger.end_progress(self.state.step)
                self.logger.info(f"{self.stop.name or 'signal'}: checkpoint written at step {self.state.step}; exiting "
                                 f"with code {EXIT_PREEMPTED} so that the job is requeued")
                self.logger.close()
                return EXIT_PREEMPTED
        self.evaluate(final=True)
        self.save_checkpoint(final=True)
        self.finish()
        return 0

    def train_segment(self) -> tuple[bool, int | None]:
        """Lower steps up to the next multiple of `unroll_steps`, then one upper step.

        Segments end at multiples of --unroll_steps, so a run resumed mid-segment completes that
        segment first and follows the uninterrupted trajectory exactly (the segment's batches read
        before the stop are read again at the resume, `_reread_segment`). A checkpoint due at a
        segment's end is written after its upper step. Returns (finished, stop signal).
        """
        run, bilevel = self.config.run, self.config.bilevel
        remaining = bilevel.unroll_steps - self.state.step % bilevel.unroll_steps
        if remaining == bilevel.unroll_steps:
            position = self.state.train
            self.state.segment_train = StreamPosition(position.epoch, position.batch)
        # The micro-batches the upper step differentiates (after a mid-segment resume: those read before it).
        kept, self._resumed_segment = self._resumed_segment, []
        for i in range(remaining):
            if self.state.step >= run.iteration_num:
                return True, None
            result = self.lower_step()
            if result is None:
                return True, None
            step_batches, stop = result
            kept = kept + step_batches if bilevel.hypergrad_batches == "segment" else step_batches[-1:]
            if i < remaining - 1:
                self.evaluate()
                if self.state.step % run.save_every_iterations == 0:
                    self.save_checkpoint()
                if stop is not None:
                    return False, stop
        # --meta_warmup_steps: the PRM first learns the task unweighted, so that the first
        # hypergradients compare domains (and records) through a PRM that already scores them.
        if not bilevel.baseline and self.state.step > bilevel.meta_warmup_steps:
            self.run_upper_step(kept)
        self.evaluate()
        if self.state.step % run.save_every_iterations == 0:
            self.save_checkpoint()
        finished = self.state.step >= run.iteration_num
        return finished, None if finished else stop

    def lower_step(self) -> tuple[list[dict[str, torch.Tensor]], int | None] | None:
        """One PRM optimiser step over `gradiant_accumulation` micro-batches with the current weights.

        Returns (its micro-batches, stop signal or None), or None when the data is exhausted.
        """
        weights = self.domain_weights().detach().float().to(self.info.device)
        nonfinite = torch.zeros((), device=self.info.device)
        micro_batches = []
        for _ in range(self.engine.gradient_accumulation_steps()):
            cpu_batch = self.train_batches.next()
            if cpu_batch is None:
                return None
            batch = self.engine.to_device(cpu_batch)
            per_sample = self.lower_loss(self.engine.forward(model_inputs(batch)), batch["target"])
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
                self.window.add(per_sample, batch["domain"], loss, batch["attention_mask"])
                self.state.samples += per_sample.numel() * self.info.world_size
        if self.state.step % self.config.run.log_every == 0:
            self.log_window()
        return [batch for batch, _, _ in micro_batches], int(stop) or None

    def run_upper_step(self, train_batches: list[dict[str, torch.Tensor]]) -> None:
        b = self.config.bilevel
        started = time.perf_counter()
        meta_batch = self.engine.to_device(self.meta_batches.next())
        result = upper_step(self.engine, self.domain_weights, self.meta_optimizer, meta_batch, train_batches,
                            method=b.hypergrad, radius=b.fd_radius, aggregation=b.aggregation, objective=b.meta_loss,
                            geometry=b.hypergrad_geometry, instance_weights=self.instance_weights,
                            update_domains=b.weighting not in ("instance", "instance_net"),
                            lower_loss=self.lower_loss)
        seconds = time.perf_counter() - started  # synchronised: the result came through all-reduces
        self.state.upper_steps += 1
        if result.applied:
            self.state.bad_upper_in_a_row = 0
        else:
            self._count_bad("upper")
        if self.state.upper_steps % b.weight_check_every == 0:
            self.check_replicated_weights()
        self.watch_signal(result)
        self.log_upper(result, seconds)

    def watch_signal(self, result: UpperResult) -> None:
        """Count the upper steps that had nothing to learn from, warn once, loudly, when they are half
        or more of the upper steps so far, and remember the domains that never had a directional
        derivative (`finish` names them). The configurations that can be known at start-up are refused
        by `dreamprm.preflight`; these depend on the batches drawn. (A few such steps are normal: the
        demo's balanced meta set gives a meta batch without a (right, wrong) pair now and then.)"""
        zero = (result.directional == 0).cpu()
        self._never_seen = zero if self._never_seen is None else self._never_seen & zero
        if not (result.applied and bool(zero.all())):
            return
        self._no_signal += 1
        upper = self.state.upper_steps
        if self._no_signal >= MIN_SILENT_STEPS and 2 * self._no_signal >= upper and not self._warned_no_signal:
            self._warned_no_signal = True
            self.logger.info(f"WARNING: {self._no_signal} of {upper} upper steps so far had no signal (every domain's "
                             "directional derivative exactly 0), so the weights barely move. Under --meta_loss pairwise "
                             "this happens when a meta batch holds no (right, wrong) pair: raise --meta_batch_size or "
                             "balance the meta set. (Warned once.)")

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
    def log_window(self) -> None:
        summary = self.window.summary(self.engine.all_reduce_sum)  # the sync point of logging
        if summary is None:
            return
        values = {"train/loss": summary["loss"], "train/weighted_loss": summary["weighted_loss"],
                  "train/lr": self.engine.learning_rate(), "perf/samples_per_s": summary["samples_per_s"],
                  "perf/tokens_per_s": summary["tokens_per_s"]}
        if self.info.device.type == "cuda":
            values["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.info.device) / 2**30
        for name, i in self.domains.items():
            if i in summary["domain_loss"]:
                values[f"domain_loss/{name}"] = summary["domain_loss"][i]
        self.logger.scalars(self.state.step, values)
        self.logger.progress(self.state.step - self._logged_step, loss=values["train/loss"],
                             samples_s=values["perf/samples_per_s"])
        self._logged_step = self.state.step

    def log_upper(self, result: UpperResult, seconds: float) -> None:
        step = self.state.step
        values = {"meta/v_norm": result.v_norm, "perf/upper_step_s": seconds,
                  "hypergrad/norm": float(result.hypergradient.norm())}
        # A pairwise meta batch without a (right, wrong) pair has loss 0 by definition, not a PRM that
        # ranks perfectly: such steps leave the curve (and the averages read from it) alone.
        if result.pair_accuracy is not None or self.config.bilevel.meta_loss != "pairwise":
            values["meta/loss"] = result.meta_loss
            if self.meta_trace is not None:
                self.meta_trace.add(result.meta_loss, result.pair_accuracy)
        if result.epsilon is not None:
            values["hypergrad/epsilon"] = result.epsilon
        if result.pair_accuracy is not None:  # can the PRM rank the meta chains at all (0.5: chance)?
            values["meta/pair_accuracy"] = result.pair_accuracy
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

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, final: bool = False) -> None:
        """Best-of-N on --eval_candidates when due (every --eval_every steps, and at the end), at the
        points where a checkpoint may be written; a new best (--keep_best) is checkpointed now."""
        step = self.state.step
        due = step % self.config.watch.eval_every == 0 or final
        if self.evaluator is None or not due or (self.last_eval is not None and self.last_eval[0] == step):
            return
        if not final and not self._eval_within_share():
            self.logger.info(f"eval at step {step} postponed: evaluation has taken {self.eval_seconds:.1f} s, more "
                             f"than --eval_max_share {self.config.watch.eval_max_share:g} of the run so far")
            return
        values = self.evaluator(self.engine)  # collective; the same values on every rank
        self.eval_seconds += values["seconds"]
        self.last_eval = (step, values)
        self.logger.scalars(step, {f"eval/{k}": v for k, v in values.items() if k != "seconds"}
                            | {"perf/eval_s": values["seconds"]})
        self.logger.info(describe(step, values))
        metric, best = self.config.watch.keep_best, self.checkpointer.best
        if metric is not None and metric in values and is_better(values[metric], best and best["value"]):
            self.checkpointer.set_best(metric, values[metric], step)  # first: the checkpoint holds the record
            folder = self.save_checkpoint()
            self.logger.info(f"new best {metric} {values[metric]:.4f} at step {step}: {folder}")

    def _eval_within_share(self) -> bool:
        """The same answer on every rank (each rank's clock differs, and a rank that evaluated alone
        would wait for the others forever): the largest evaluation time against the shortest run time."""
        times = torch.tensor([self.eval_seconds, -(time.perf_counter() - self._started)], dtype=torch.float64,
                             device=self.info.device)
        eval_seconds, minus_run_seconds = self.engine.all_reduce_max(times).tolist()
        return within_share(eval_seconds, -minus_run_seconds, self.config.watch.eval_max_share)

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
        self.logger.histograms(self.state.step, {f"instance_weight/{name}": weights[self.record_domains == i]
                                                 for name, i in self.domains.items()})

    def finish(self) -> None:
        """Domain-weight summary, the instance-weight report and the exported PRM."""
        weights = self.domain_weights.as_dict()
        never = self._never_seen
        if (never is not None and bool(never.any()) and not bool(never.all())
                and self.config.bilevel.weighting != "instance"):
            absent = [name for name, i in self.domains.items() if never[i]]
            self.logger.end_progress(self.state.step)
            self.logger.info(f"WARNING: domain(s) {absent} were in no training batch that an upper step differentiated "
                             f"({self.state.upper_steps} upper steps): their weights moved only through the mean-1 "
                             "normalisation, not from their own data. Train longer, or use a larger --batch_size "
                             "(and --hypergrad_batches segment, the default).")
        if self._no_signal and not self._warned_no_signal:
            self.logger.info(f"note: {self._no_signal} of {self.state.upper_steps} upper steps had no signal (a meta "
                             "batch without a (right, wrong) pair under --meta_loss pairwise)")
        report = None
        if self.engine.is_main:
            write_domain_weight_summary(self.output, weights, self.domain_weights.logits.detach().tolist())
            if self.instance_weights is not None:
                report = write_instance_weight_report(self.output, self.config.data.train_json_file, self.train_records,
                                                      self.instance_weights.all_weights().tolist(),
                                                      self.instance_weights.last_losses().tolist(),
                                                      self.instance_weights.last_predictions().tolist())
                self.logger.info(f"instance weights of {len(self.train_records)} records, lowest first: {report}")
        last_step, export_step = self.state.step, None
        if self.config.run.export:
            export_step, exported_weights = self._load_export_source(weights)
            state_dict = self.engine.consolidated_state_dict()
            if self.engine.is_main:
                meta = {"base_model": self.reward_model, "domains": self.domains, "domain_weights": exported_weights,
                        "weighting": self.config.bilevel.weighting,
                        "aggregation": self.config.bilevel.aggregation, "step": export_step,
                        "max_image_side": self.config.data.max_image_side,
                        "judge_tokens": self.config.model.judge_tokens}
                export_prm(self.output / "export", state_dict, self.engine.module, self.processor, meta)
        self.logger.end_progress(last_step)
        if self.engine.is_main:
            self.write_summary(last_step, weights, report, export_step)
        self.logger.info(f"done at step {last_step}; domain weights: "
                         + ", ".join(f"{k}={v:.3f}" for k, v in weights.items()))
        self.logger.close()

    def _load_export_source(self, last_weights: dict[str, float]) -> tuple[int, dict[str, float]]:
        """(step, domain weights) of what --export writes; --export_from best loads the best checkpoint
        into the engine first (collective; training is over)."""
        if self.config.watch.export_from != "best":
            return self.state.step, last_weights
        folder = self.checkpointer.best_folder()
        if folder is None:
            self.logger.info("--export_from best: no best checkpoint was written (no evaluation ran); exporting the "
                             f"last step's PRM (step {self.state.step})")
            return self.state.step, last_weights
        best = self.checkpointer.best
        if best["step"] != self.state.step:
            saved = self.checkpointer.load(folder, check=self._check_compatible)
            self.domain_weights.load_state_dict(saved["domain_weights"])
        self.logger.info(f"exporting the best checkpoint by {best['metric']} ({best['value']:.4f}): {folder}")
        return best["step"], self.domain_weights.as_dict()

    def write_summary(self, last_step: int, weights: dict[str, float], report: Path | None,
                      export_step: int | None) -> None:
        """Rank 0: summary.md in the output folder, printed too."""
        seconds = time.perf_counter() - self._started
        lowest = None
        if report is not None:
            with open(report, encoding="utf-8") as f:
                lowest = [json.loads(line) for _, line in zip(range(10), f)]
        text, path = write_run_summary(self.output, RunSummary(
            steps=last_step, seconds=seconds, samples_per_s=(self.state.samples - self._started_samples) / seconds,
            weights=weights, eval_seconds=self.eval_seconds, final_eval=self.last_eval, best=self.checkpointer.best,
            lowest_records=lowest, export=str(self.output / "export") if export_step is not None else None,
            export_step=export_step, meta=self.meta_trace))
        self.logger.info(text + f"(written to {path})")
