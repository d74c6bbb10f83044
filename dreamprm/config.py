"""Typed configuration for every entry point: sections as dataclasses, flat command-line flags.

The original DreamPRM's flags keep their names and types (``--gradiant_accumulation`` with its
spelling, ``--gradient_accumulation`` accepted too). Defaults point at the bundled demo and the tiny
offline model so that ``deepspeed launch/train.py`` with no flags runs out of the box. Each field's
help text is its documentation; ``--help`` prints all of them. This module imports the standard
library only (and `dreamprm.flags`, which does too).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamprm.flags import DefaultsHelpFormatter, add_flags, values_of
from dreamprm.flags import flag as _f  # every field below is a flag

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "data" / "demo"
TINY_MODEL = "tiny"  # --reward_model value that builds the offline tiny Qwen2-VL on first use

HYPERGRAD_METHODS = ("exact", "fd", "fd_bf16_naive")
# Step scores -> chain score: the names, here for --aggregation's choices without importing torch;
# `dreamprm.bilevel.aggregation.AGGREGATIONS` maps these names to the functions.
AGGREGATIONS = ("mean_logit", "mean", "min", "max", "product", "last")
META_LOSSES = ("pairwise", "mse")
UPPER_PRECISIONS = ("fp32", "engine")
META_OPTIMIZERS = ("gated", "adamw", "sgd")
WEIGHTINGS = ("domain", "instance", "both", "instance_net", "both_net")
INSTANCE_NET_FEATURES = ("mc", "gap", "position", "domain")  # dreamprm/bilevel/instance_net.py says what each is
TRACKERS = ("tensorboard", "wandb", "mlflow")


# The exit code of a user's mistake (a bad flag, config file or record), argparse's own for a bad flag;
# every entry point uses it.
EXIT_USER_ERROR = 2


class ConfigError(ValueError):
    """A flag or a DeepSpeed config value is invalid; the message names the flag or the file and key."""


@dataclass
class DataConfig:
    train_json_file: str = _f(str(DEMO_DIR / "train.json"), "training records (lower level), JSON list or JSONL")
    meta_json_file: str = _f(str(DEMO_DIR / "meta.json"), "meta records (upper level), JSON list or JSONL")
    image_root: str | None = _f(None, "folder image paths are relative to (default: each JSON file's folder)")
    max_image_side: int = _f(512, "longest image side in pixels; larger images are downscaled")
    num_workers: int = _f(0, "data-loader worker processes per rank")
    skip_invalid_records: bool = _f(False, "train on the valid records of files that also hold invalid ones: counts "
                                    "per reason are printed and every record left out is written with its reasons "
                                    "to skipped_records.jsonl in the output folder (default: refuse the files)")
    packing: str = _f("chain", "'chain': the step prefixes of a chain in one sequence, scored exactly as one by one "
                      "(meta chains, Best-of-N, and the training records of one chain that share a batch: "
                      "data/README.md); 'none': one sequence per prefix, as the original", choices=("none", "chain"))
    chain_batches: bool = _f(False, "--packing chain: sample the training records of a chain together, so that they "
                             "share a batch and a packed row (3.4x fewer training tokens on 5-8-step chains); "
                             "batches then hold fewer independent chains (the demo's weights no longer separate)")


@dataclass
class ModelConfig:
    reward_model: str = _f(TINY_MODEL, "Qwen2-VL directory or hub-style name in the local cache; "
                           f"'{TINY_MODEL}' builds the offline tiny model")
    head: str = _f("logits", "score head: 'logits' (the original's Linear(vocab,1)), 'hidden' (Linear(hidden,1)) or "
                   "'generative' (no new parameters: the language-model head judges each step '+' or '-', one step "
                   "per chat turn; the score's logit is log P(+) - log P(-))", choices=("logits", "hidden", "generative"))
    judge_tokens: str = _f("+,-", "--head generative: the positive and negative judgement, comma-separated; each must "
                           "be a single token of the backbone's tokenizer")
    generative_loss: str = _f("bce", "--head generative: lower-level loss of P(+) against the Monte Carlo accuracy: "
                              "'bce' (binary cross-entropy, the accuracy as a soft target) or 'mse' (squared error, "
                              "as the scalar heads)", choices=("bce", "mse"))
    trust_remote_code: bool = _f(False, "allow model code from the model directory (off unless asked for)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")


@dataclass
class OptimConfig:
    batch_size: int = _f(1, "micro-batch size per rank (training records)")
    gradiant_accumulation: int = _f(1, "micro-batches per optimiser step (the original's spelling; "
                                    "--gradient_accumulation works too)", aliases=("--gradient_accumulation",))
    lr: float = _f(5e-7, "PRM learning rate (AdamW)")
    weight_decay: float = _f(1e-3, "PRM weight decay")
    scheduler_step_size: int = _f(5000, "StepLR: decay the PRM learning rate every N optimiser steps")
    scheduler_gamma: float = _f(0.5, "StepLR: decay factor")
    precision: str = _f("bf16", "parameter/compute precision of the PRM engine", choices=("bf16", "fp16", "fp32"))


@dataclass
class BilevelConfig:
    baseline: bool = _f(False, "train a vanilla PRM: uniform domain weights, no upper level")
    meta_lr: float = _f(0.01, "domain-logit learning rate (of --meta_optimizer)")
    meta_weight_decay: float = _f(0.0, "domain-logit weight decay (pulls the weights toward uniform)")
    meta_optimizer: str = _f("gated", "domain-logit optimiser: 'gated' (steps only as far as the averaged "
                             "hypergradient stands out from its noise; docs/hypergradient.md), 'adamw' (the "
                             "original's), 'sgd'", choices=META_OPTIMIZERS)
    meta_beta: float = _f(0.98, "--meta_optimizer gated: averaging factor of the hypergradient's moving averages "
                          "(pools about (1+β)/(1-β) upper steps)")
    meta_evidence: float = _f(0.0, "--meta_optimizer gated: also wait until the averaged meta loss stands this many "
                              "standard errors below chance (0: off; docs/hypergradient.md, 'Pairs within a question, "
                              "and a gate at chance')")
    meta_loss: str = _f("pairwise", "upper-level objective: 'pairwise' (right chains scored above wrong ones, "
                        "-log sigmoid(z_right - z_wrong); what Best-of-N needs) or 'mse' (the original's "
                        "(sigmoid(z) - label)^2)", choices=META_LOSSES)
    unroll_steps: int = _f(5, "lower-level optimiser steps per segment (one upper step after each)")
    meta_batch_size: int = _f(8, "meta chains per rank in each upper step (the original's 1 leaves the pairwise "
                              "objective without pairs on one rank)")
    aggregation: str = _f("mean_logit", "step scores -> chain score for the meta loss", choices=AGGREGATIONS)
    hypergrad: str = _f("exact", "hypergradient estimator: 'exact' (per-domain inner products, ε-free), "
                        "'fd' (central difference on fp32 parameters), 'fd_bf16_naive' (the original's)",
                        choices=HYPERGRAD_METHODS)
    upper_precision: str = _f("fp32", "arithmetic of the upper level's passes (meta-gradient, exact's per-domain "
                              "backward passes): 'fp32' on the engine's bf16/fp16 parameters as they are (the "
                              "directional derivatives are small differences: in bf16 arithmetic the pairwise "
                              "objective's were off by up to 63%%, signs wrong; docs/hypergradient.md) or 'engine' "
                              "(the engine's precision: faster, accurate for fp32 engines only)",
                              choices=UPPER_PRECISIONS)
    fd_radius: float = _f(0.01, "finite difference: ε = fd_radius / ||v||")
    hypergrad_batches: str = _f("segment", "training micro-batches whose directional derivatives an upper step "
                                "averages: 'segment' (every one of the segment; less noise, one pass each) or "
                                "'last' (the original's)", choices=("segment", "last"))
    hypergrad_geometry: str = _f("sgd", "inner products of the hypergradient: 'sgd' (<∇L_k, v>, DARTS) or 'adam' "
                                 "(<P ∇L_k, v>, P the PRM optimiser's preconditioner 1/(sqrt(v̂)+δ), "
                                 "δ = mean sqrt(v̂) / 100)",
                                 choices=("sgd", "adam"))
    weighting: str = _f("domain", "what the upper level weights: 'domain' (one weight per domain, DreamPRM), "
                        "'instance' (one per training record, DreamPRM-1.5; a report of the records it learned to "
                        "distrust in instance_weights.jsonl), 'both' (their product), 'instance_net' (each "
                        "record's weight from its features by a small replicated network, DreamPRM-1.5's Instance "
                        "Net) or 'both_net' (domain x net); instance weights need --hypergrad fd (all records' "
                        "derivatives from the same two forwards)", choices=WEIGHTINGS)
    instance_lr: float = _f(0.3, "--weighting instance/both: how far one visit moves a record's logit (the step is "
                            "instance_lr · g / rms(g), the RMS over the update's records)")
    instance_recipe: str = _f("softplus", "--weighting instance/both: 'softplus' (weights softplus(a_i) normalised "
                              "to mean 1 over the table) or 'clipped' (DreamPRM-1.5's recipe, a baseline: the table "
                              "holds the weights, unnormalised, each clipped to [-1, 3])", choices=("softplus", "clipped"))
    instance_net_lr: float = _f(0.01, "--weighting instance_net/both_net: Adam's learning rate of the net (its "
                                "hypergradient is RMS-normalised over each update's records first)")
    instance_net_features: str = _f("gap,position,domain", "--weighting instance_net/both_net: the net's inputs, "
                                    "a comma list of " + ", ".join(INSTANCE_NET_FEATURES) + " (mc: Monte Carlo "
                                    "accuracy; gap: sqrt of the record's lower loss at the last visit, |accuracy - "
                                    "PRM prediction| for the squared error; position: step index / last step of the "
                                    "chain; domain: one-hot). The default leaves mc out: "
                                    "with it the net found corrupted records worse in 3 of 3 benchmark seeds")
    weight_check_every: int = _f(10, "check every N upper steps that all ranks hold identical domain weights")
    meta_warmup_steps: int = _f(0, "cold start: the first N lower-level steps are vanilla (every weight 1, no upper "
                                "step); the upper level starts with the first segment that ends after step N")


@dataclass
class RunConfig:
    weights_path: str | None = _f(None, "output folder: checkpoints, TensorBoard (tb/), exports (default runs/<timestamp>)")
    deepspeed: str = _f(str(REPO_ROOT / "ds_configs" / "zero3.json"), "DeepSpeed JSON config")
    iteration_num: int = _f(400, "lower-level optimiser steps in total (demo-sized default)")
    max_epoch: int = _f(120, "stop after this many passes over the training records")
    device: str = _f("auto", "'auto', 'cuda' or 'cpu'")
    seed: int = _f(1, "random seed (data order, initialisation of the head)")
    local_rank: int = _f(-1, "set by the deepspeed launcher; ranks otherwise come from the environment")
    save_every_iterations: int = _f(1000, "checkpoint every N lower-level steps (and at the end)")
    keep_last: int = _f(3, "keep the newest N complete checkpoints, 0 keeps all; older ones are deleted only "
                        "once a newer one is complete. A run's final checkpoint and export/ are never deleted")
    resume: str | None = _f(None, "'auto' (newest complete checkpoint in --weights_path, if any) or a checkpoint folder")
    log_every: int = _f(10, "log scalars every N lower-level steps")
    max_bad_steps: int = _f(5, "stop after this many consecutive non-finite losses or hypergradients")
    export: bool = _f(True, "export the trained PRM in Hugging Face form at the end")
    dist_timeout: int = _f(600, "seconds a collective may wait for a missing rank before the job fails")


@dataclass
class WatchConfig:
    """Watching a run: Best-of-N validation during training, the best checkpoint, the trackers."""
    eval_candidates: str | None = _f(None, "held-out Best-of-N candidates file (format: data/README.md; labels or "
                                     "ground truth needed) scored by the live PRM every --eval_every steps: "
                                     "eval/best_of_N and eval/auc go to every tracker and the console")
    eval_every: int = _f(50, "lower-level steps between two evaluations (and one at the end)")
    eval_max_share: float = _f(0.1, "evaluation's share of the run's time at most: an evaluation due while the "
                               "evaluations so far took more than this share of the time since the start is "
                               "postponed to the next due step (the last one always runs); 1 never postpones")
    eval_batch_size: int = _f(16, "candidate chains per rank in one evaluation forward pass")
    eval_image_root: str | None = _f(None, "folder the candidates' image paths are relative to (default: the "
                                     "candidates file's folder)")
    keep_best: str | None = _f(None, "an evaluation metric (best_of_N or auc; higher is better): the checkpoint "
                               "with its best value is written when it is reached and kept apart from --keep_last "
                               "(its record: checkpoints/best.json; resume keeps it)")
    export_from: str = _f("last", "what --export writes: the 'last' step's PRM or the 'best' checkpoint's "
                          "(--keep_best)", choices=("last", "best"))
    report_to: str = _f("tensorboard", "comma-separated trackers of every scalar: tensorboard, wandb (offline "
                        "unless an API key is set or WANDB_MODE says otherwise), mlflow (a file store in the "
                        "output folder unless --mlflow_tracking_uri); 'none' for none")
    wandb_project: str = _f("dreamprm", "W&B project, and the MLflow experiment name")
    mlflow_tracking_uri: str | None = _f(None, "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                         "<output>/mlruns)")

    @property
    def trackers(self) -> list[str]:
        names = [n.strip() for n in self.report_to.split(",") if n.strip()]
        return [] if names == ["none"] else names

    def validate(self) -> None:
        for name in ("eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 < self.eval_max_share <= 1:
            raise ConfigError(f"--eval_max_share: must be in (0, 1], got {self.eval_max_share}")
        unknown = [n for n in self.trackers if n not in TRACKERS]
        if unknown or len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"--report_to {self.report_to}: a comma-separated list of distinct trackers from "
                              f"{', '.join(TRACKERS)}, or 'none'")
        if self.keep_best is not None:
            if not self.eval_candidates:
                raise ConfigError(f"--keep_best {self.keep_best} needs --eval_candidates (the metric comes from it)")
            if not re.fullmatch(r"best_of_[1-9]\d*|auc", self.keep_best):
                raise ConfigError(f"--keep_best {self.keep_best}: must be best_of_N (N a power of 2 up to the "
                                  "candidates' N, or that N) or auc")
        if self.export_from == "best" and self.keep_best is None:
            raise ConfigError("--export_from best needs --keep_best METRIC (which checkpoint is the best)")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "bilevel": BilevelConfig, "run": RunConfig,
            "watch": WatchConfig}


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    bilevel: BilevelConfig = field(default_factory=BilevelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    explicit_flags: frozenset[str] = frozenset()  # flags the user typed, for DeepSpeed "auto" conflicts

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def problems(self) -> list[str]:
        """Every flag value that cannot run, one line each (all of them, not the first)."""
        found: list[str] = []
        positive = {"batch_size": self.optim.batch_size, "gradiant_accumulation": self.optim.gradiant_accumulation,
                    "unroll_steps": self.bilevel.unroll_steps, "meta_batch_size": self.bilevel.meta_batch_size,
                    "iteration_num": self.run.iteration_num, "max_epoch": self.run.max_epoch,
                    "save_every_iterations": self.run.save_every_iterations, "log_every": self.run.log_every,
                    "scheduler_step_size": self.optim.scheduler_step_size, "max_image_side": self.data.max_image_side,
                    "weight_check_every": self.bilevel.weight_check_every, "max_bad_steps": self.run.max_bad_steps,
                    "dist_timeout": self.run.dist_timeout}
        found += [f"--{name}: must be >= 1, got {value}" for name, value in positive.items() if value < 1]
        if not (math.isfinite(self.bilevel.meta_evidence) and self.bilevel.meta_evidence >= 0):
            found.append(f"--meta_evidence: must be a number >= 0, got {self.bilevel.meta_evidence}")
        if self.bilevel.meta_warmup_steps < 0:
            found.append(f"--meta_warmup_steps: must be >= 0, got {self.bilevel.meta_warmup_steps}")
        if not 0.0 <= self.bilevel.meta_beta < 1.0:
            found.append(f"--meta_beta: must be in [0, 1), got {self.bilevel.meta_beta}")
        for name, value in {"lr": self.optim.lr, "meta_lr": self.bilevel.meta_lr, "fd_radius": self.bilevel.fd_radius,
                            "instance_lr": self.bilevel.instance_lr,
                            "instance_net_lr": self.bilevel.instance_net_lr}.items():
            if not (math.isfinite(value) and value > 0):
                found.append(f"--{name}: must be a positive number, got {value}")
        for name, value in {"weight_decay": self.optim.weight_decay, "scheduler_gamma": self.optim.scheduler_gamma,
                            "meta_weight_decay": self.bilevel.meta_weight_decay}.items():
            if not (math.isfinite(value) and value >= 0):
                found.append(f"--{name}: must be a number >= 0, got {value}")
        if self.bilevel.weighting != "domain" and not self.bilevel.baseline and self.bilevel.hypergrad == "exact":
            found.append(f"--weighting {self.bilevel.weighting} needs every record's directional derivative: "
                         "--hypergrad fd --precision fp32 gives all of them from the same two forwards "
                         "(--hypergrad exact would take one backward pass per record)")
        names = [x.strip() for x in self.bilevel.instance_net_features.split(",") if x.strip()]
        if not names or any(x not in INSTANCE_NET_FEATURES for x in names) or len(set(names)) != len(names):
            found.append(f"--instance_net_features: {self.bilevel.instance_net_features!r} must name each of "
                         f"{', '.join(INSTANCE_NET_FEATURES)} at most once (and at least one)")
        if self.data.num_workers < 0:
            found.append(f"--num_workers: must be >= 0, got {self.data.num_workers}")
        if self.run.keep_last < 0:
            found.append(f"--keep_last: must be >= 0 (0 keeps all), got {self.run.keep_last}")
        if self.data.chain_batches and self.data.packing != "chain":
            found.append("--chain_batches samples chains together for packed rows: it needs --packing chain, "
                         f"got --packing {self.data.packing}")
        judge = self.model.judge_tokens.split(",")
        if len(judge) != 2 or not all(judge) or judge[0] == judge[1]:
            found.append(f"--judge_tokens: expected two different tokens separated by a comma, positive first "
                         f"(e.g. '+,-'), got {self.model.judge_tokens!r}")
        if self.run.device not in ("auto", "cuda", "cpu") and not self.run.device.startswith("cuda:"):
            found.append(f"--device: must be 'auto', 'cuda', 'cuda:N' or 'cpu', got {self.run.device!r}")
        try:
            self.watch.validate()
        except ConfigError as err:
            found.append(str(err))
        return found

    def validate(self) -> "TrainConfig":
        found = self.problems()
        if found:
            raise ConfigError("\n".join(found))
        return self


def numerics_warnings(config: TrainConfig) -> list[str]:
    """Combinations that run but give a hypergradient known to be wrong (docs/hypergradient.md's bf16
    table), one line each, for the start of a run; `--precision` must be resolved (resolve_ds_config)."""
    b, precision = config.bilevel, config.optim.precision
    if b.baseline or precision == "fp32":
        return []
    lines = []
    if b.hypergrad == "fd_bf16_naive":
        lines.append(f"--hypergrad fd_bf16_naive on {precision} parameters is the original's finite difference: "
                     "its perturbation is mostly rounded away (measured 9-53% off, signs wrong in places); "
                     "kept for comparison: use --hypergrad exact")
    elif b.upper_precision == "engine" and b.meta_loss == "pairwise":
        lines.append(f"--upper_precision engine with --precision {precision} and --meta_loss pairwise: the "
                     "directional derivatives are off by up to 63% with wrong signs (docs/hypergradient.md); "
                     "use --upper_precision fp32 (the default)")
    return lines



def precision_problem(config: TrainConfig) -> str | None:
    """fd on 16-bit parameters (after the DeepSpeed JSON has settled --precision): advice that the
    rest of the flags allow."""
    b, precision = config.bilevel, config.optim.precision
    if b.hypergrad != "fd" or b.baseline or precision == "fp32":
        return None
    why = (f"--hypergrad fd needs --precision fp32: with {precision} parameters the perturbation εv is mostly "
           "rounded away (measured: 23-88% error at 2B). ")
    if b.weighting != "domain":
        # exact cannot give per-record derivatives, so it is no advice here.
        return why + f"Add --precision fp32 (--weighting {b.weighting} needs --hypergrad fd)."
    return why + ("Add --precision fp32, or use --hypergrad exact (the default, ε-free, accurate in bf16), or "
                  "--hypergrad fd_bf16_naive to reproduce the original.")


def build_parser(prog: str = "launch/train.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="DreamPRM-DS: bi-level domain-reweighted PRM training on DeepSpeed.",
        formatter_class=DefaultsHelpFormatter)
    for section, cls in SECTIONS.items():
        add_flags(parser, cls, group=section)
    return parser


def parse_args(argv: list[str] | None = None, prog: str = "launch/train.py", check: bool = True) -> TrainConfig:
    """Flags -> config, validated unless `check` is False (the caller then reports `problems()` with
    the other start-up problems). Unknown flags are an error (argparse exits 2 naming them)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    # Which flags were typed: parse again with every default suppressed.
    typed = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            typed.add_argument(*action.option_strings, dest=action.dest, default=argparse.SUPPRESS,
                               **({"action": argparse.BooleanOptionalAction}
                                  if isinstance(action, argparse.BooleanOptionalAction) else {"type": str}))
    explicit = frozenset(vars(typed.parse_known_args(argv)[0]))
    values = vars(args)
    # `accelerate launch` hands its YAML's deepspeed_config_file to the processes only this way.
    accelerate_ds = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if accelerate_ds and "deepspeed" not in explicit:
        values["deepspeed"] = str(Path(accelerate_ds).resolve())
    config = TrainConfig(**{name: values_of(cls, values) for name, cls in SECTIONS.items()}, explicit_flags=explicit)
    if not check:
        return config
    try:
        return config.validate()
    except ConfigError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--deepspeed {path}: cannot be read ({err})") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON ({err.msg} at line {err.lineno} column {err.colno})") from err
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object, found {type(ds).__name__}")
    return ds


def resolve_ds_config(ds: dict[str, Any], config: TrainConfig, *, world_size: int, on_gpu: bool,
                      source: str = "DeepSpeed config") -> dict[str, Any]:
    """Fill the "auto" values of a DeepSpeed config from the flags; a real conflict is an error.

    A concrete JSON value wins over a flag the user did not type (the flag's value is updated to
    match); a typed flag that disagrees with a concrete JSON value is a conflict.
    """
    ds = json.loads(json.dumps(ds))  # deep copy
    o = config.optim

    def lookup(keys: tuple[str, ...]) -> tuple[dict[str, Any], Any]:
        """The parent object of `keys` (created when absent) and the value there ("auto" when absent)."""
        node = ds
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {'.'.join(keys[:i + 1])}: must be a JSON object, got {node!r}")
        return node, node.get(keys[-1], "auto")

    def settle(keys: tuple[str, ...], flag: str | None, value: Any, apply: Any = None) -> Any:
        node, current = lookup(keys)
        dotted = ".".join(keys)
        if current == "auto":
            node[keys[-1]] = value
            return value
        # The JSON value must have the flag's type (true/false for bf16.enabled, 2 not "2" for a batch size).
        if type(current) is not type(value) and not (type(value) is float and type(current) is int):
            raise ConfigError(f"{source}: {dotted}: expected {type(value).__name__} or \"auto\", got {current!r}")
        if flag and flag in config.explicit_flags and current != value:
            raise ConfigError(f"--{flag} {value} conflicts with {dotted}={current!r} in {source}; "
                              f"change one of them or set {dotted} to \"auto\"")
        if apply is not None:
            apply(current)
        return current

    if not isinstance(ds.get("zero_optimization", {}), dict):
        raise ConfigError(f"{source}: zero_optimization: must be a JSON object, got {ds['zero_optimization']!r}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage: must be 0, 1, 2 or 3, got {stage!r}")
    micro = settle(("train_micro_batch_size_per_gpu",), "batch_size", o.batch_size,
                   lambda v: setattr(o, "batch_size", int(v)))
    gas = settle(("gradient_accumulation_steps",), "gradiant_accumulation", o.gradiant_accumulation,
                 lambda v: setattr(o, "gradiant_accumulation", int(v)))
    for key, count in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas)):
        if count < 1:
            raise ConfigError(f"{source}: {key}: must be >= 1, got {count}")
    total = micro * gas * world_size
    if ds.get("train_batch_size", "auto") not in ("auto", total):
        raise ConfigError(f"{source}: train_batch_size={ds['train_batch_size']} conflicts with "
                          f"train_micro_batch_size_per_gpu ({micro}) x gradient_accumulation_steps ({gas}) "
                          f"x world size ({world_size}) = {total}")
    ds["train_batch_size"] = total
    enabled = {name: lookup((name, "enabled"))[1] for name in ("bf16", "fp16")}
    if enabled["bf16"] is True and enabled["fp16"] is True:
        raise ConfigError(f"{source}: bf16.enabled and fp16.enabled are both true")
    if "precision" not in config.explicit_flags:
        # Concrete JSON values decide an untyped --precision; disabling its default without enabling
        # the other means fp32 (the model is built in the precision the engine runs).
        if True in enabled.values():
            o.precision = "bf16" if enabled["bf16"] is True else "fp16"
        elif enabled.get(o.precision) is False:
            o.precision = "fp32"
    for name in ("bf16", "fp16"):
        value = settle((name, "enabled"), None, o.precision == name)
        if value != (o.precision == name):
            raise ConfigError(f"--precision {o.precision} conflicts with {name}.enabled={value} in {source}")
    if "optimizer" in ds:
        settle(("optimizer", "params", "lr"), "lr", o.lr, lambda v: setattr(o, "lr", float(v)))
        settle(("optimizer", "params", "weight_decay"), "weight_decay", o.weight_decay,
               lambda v: setattr(o, "weight_decay", float(v)))
        params = ds["optimizer"]["params"]
        if params.get("torch_adam") == "auto":
            # FusedAdam JIT-compiles (~45 s) and needs CUDA; torch's AdamW is the CPU choice.
            params["torch_adam"] = not on_gpu
    if ds.get("gradient_clipping") == "auto":
        ds["gradient_clipping"] = 1.0
    ds.setdefault("steps_per_print", 10**9)
    return ds
