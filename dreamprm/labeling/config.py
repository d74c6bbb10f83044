"""``dreamprm-label`` flags: one frozen dataclass per subcommand, its fields the flags (`dreamprm.flags`
builds the parsers, as for training and Best-of-N)."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from dreamprm.flags import DefaultsHelpFormatter, add_flags, flag, values_of
from dreamprm.labeling.chains import DEFAULT_INSTRUCTION, SPLIT_RULES
from dreamprm.labeling.engines import ENGINES, Sampling
from dreamprm.labeling.montecarlo import LabelSettings
from dreamprm.labeling.verify import VERIFIERS

PROG = "dreamprm-label"


@dataclass(frozen=True)
class LabelConfig:
    # input / output
    questions: str = flag(None, "questions file: JSON list or JSONL with id, question, image_path, ground_truth, "
                          "dataset, optional choices and split (train/meta/test) (docs/labeling.md)",
                          group="input/output", required=True)
    image_root: str | None = flag(None, "folder image paths are relative to (default: the questions file's folder)",
                                  group="input/output")
    out: str = flag(None, "folder for the shard files (shard-I-of-N.jsonl); `dreamprm-label merge --out` reads it",
                    group="input/output", required=True)
    shard: str = flag("0/1", "this process's shard i/n of the questions (split by question id)",
                      group="input/output")
    # policy and engine
    policy: str = flag(None, "policy VLM directory (Qwen2-VL family; 'tiny' files from python -m dreamprm.model.tiny)",
                       group="policy", required=True)
    engine: str = flag("transformers", "generation engine: transformers (CPU/CI) or vllm (GPU, extra [vllm])",
                       group="policy", choices=ENGINES)
    device: str = flag("cpu", "transformers engine: 'cpu', 'cuda' or 'cuda:N'", group="policy")
    dtype: str = flag("fp32", "policy weights' precision", group="policy", choices=("fp32", "bf16", "fp16"))
    tensor_parallel_size: int = flag(1, "vllm engine: GPUs the model is split across (one shard per node)",
                                     group="policy")
    gpu_memory_utilization: float = flag(0.9, "vllm engine: share of GPU memory it may take", group="policy")
    max_model_len: int | None = flag(None, "vllm engine: context length (default: the model's)", group="policy")
    max_image_side: int = flag(512, "longest image side in pixels, as in training", group="policy")
    # chains
    chains: int = flag(4, "K: chains sampled per training question", group="chains")
    meta_chains: int = flag(4, "chains sampled per meta question", group="chains")
    candidates: int = flag(8, "N: chains sampled per test question (Best-of-N candidates)", group="chains")
    temperature: float = flag(0.7, "sampling temperature of chains and rollouts (0: greedy)", group="chains")
    top_p: float = flag(0.95, "nucleus sampling of chains and rollouts", group="chains")
    max_new_tokens: int = flag(512, "longest chain, in tokens", group="chains")
    split_rule: str = flag("step", "how a chain is cut into steps: 'step' (Step n: markers) or 'blank' (paragraphs)",
                           group="chains", choices=SPLIT_RULES)
    instruction: str = flag(DEFAULT_INSTRUCTION, "asked of the policy after the question", group="chains")
    prefill: str = flag("Step 1:", "the assistant turn starts with it (keeps the step format; '' for none)",
                        group="chains")
    # Monte Carlo labels
    rollouts: int = flag(4, "M: rollouts per step prefix (and per adaptive round)", group="Monte Carlo")
    max_rollouts: int | None = flag(None, "adaptive budget: while 0 < accuracy < 1, M more rollouts up to this "
                                    "many (default: M, a fixed budget)", group="Monte Carlo")
    rollout_max_new_tokens: int | None = flag(None, "longest rollout, in tokens (default: --max_new_tokens)",
                                              group="Monte Carlo")
    verifier: str = flag("auto", "answer checker: " + ", ".join(VERIFIERS), group="Monte Carlo")
    tolerance: float = flag(1e-4, "number verifier: relative tolerance", group="Monte Carlo")
    # run
    seed: int = flag(0, "seed of every sample (same seed and engine: same records)", group="run")
    progress: bool = flag(True, "show the progress bar (rollouts/s, tokens/s, time left)", group="run")

    def validate(self) -> "LabelConfig":
        for name in ("chains", "meta_chains", "candidates", "rollouts", "max_new_tokens", "tensor_parallel_size",
                     "max_image_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_rollouts is not None and self.max_rollouts < self.rollouts:
            raise ValueError(f"--max_rollouts {self.max_rollouts}: must be >= --rollouts {self.rollouts}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"--temperature must be >= 0 and --top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.verifier not in VERIFIERS:
            raise ValueError(f"--verifier {self.verifier}: one of {', '.join(VERIFIERS)}")
        return self

    def settings(self) -> LabelSettings:
        chain = Sampling(self.temperature, self.top_p, self.max_new_tokens)
        rollout = Sampling(self.temperature, self.top_p, self.rollout_max_new_tokens or self.max_new_tokens)
        return LabelSettings(chains=self.chains, meta_chains=self.meta_chains, candidates=self.candidates,
                             rollouts=self.rollouts, max_rollouts=self.max_rollouts or self.rollouts,
                             split_rule=self.split_rule, instruction=self.instruction, prefill=self.prefill,
                             chain_sampling=chain, rollout_sampling=rollout, seed=self.seed)

    def identity(self) -> dict[str, Any]:
        """What decides the records: a resumed shard must match it (the progress bar and paths of
        the output folder do not)."""
        keep = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("out", "progress", "gpu_memory_utilization"):
            keep.pop(name)
        return keep


@dataclass(frozen=True)
class MergeConfig:
    out: str = flag(None, "the folder the shards wrote (dreamprm-label --out)", group="merge", required=True)
    to: str | None = flag(None, "folder for train.json, meta.json, candidates.json (default: --out)", group="merge")
    balance_meta: bool = flag(False, "per domain, as many right as wrong meta chains (the larger side subsampled)",
                              group="merge")
    seed: int = flag(0, "seed of the meta balancing", group="merge")
    allow_partial: bool = flag(False, "merge although shards are missing or unfinished", group="merge")


@dataclass(frozen=True)
class ImportConfig:
    annotations: str = flag(None, "VisualPRM-400K-Raw annotation files (comma-separated .jsonl paths or a folder)",
                            group="import", required=True)
    out: str = flag(None, "train.json to write", group="import", required=True)
    image_prefix: str = flag("", "prepended to each image path (e.g. the folder the images were unpacked to)",
                             group="import")


COMMANDS = {"merge": (MergeConfig, "merge the shard files into train.json, meta.json and candidates.json"),
            "import-visualprm": (ImportConfig, "convert VisualPRM-400K-Raw annotations into train.json")}


def build_parser(command: str | None, prog: str = PROG) -> argparse.ArgumentParser:
    if command is None:
        parser = argparse.ArgumentParser(
            prog=prog, formatter_class=DefaultsHelpFormatter,
            description="Label questions with a policy VLM: Monte Carlo step labels (train), whole chains "
                        "(meta), Best-of-N candidates (test). Subcommands: "
                        + "; ".join(f"'{prog} {name} --help': {text}" for name, (_, text) in COMMANDS.items()))
        add_flags(parser, LabelConfig)
        return parser
    cls, text = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"{prog} {command}", description=text, formatter_class=DefaultsHelpFormatter)
    add_flags(parser, cls)
    return parser


def parse_args(argv: Sequence[str], prog: str = PROG) -> tuple[str | None, Any]:
    """(subcommand or None for labelling, its frozen config); a bad flag exits 2 with argparse's message."""
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command, prog)
    values = vars(parser.parse_args(argv[1:] if command else argv))
    if command:
        return command, values_of(COMMANDS[command][0], values)
    try:
        return None, values_of(LabelConfig, values).validate()
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable
