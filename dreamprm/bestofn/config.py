"""Best-of-N flags: one frozen dataclass, its fields the flags (`dreamprm.flags` builds the parser
as it does for training)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dreamprm.config import AGGREGATIONS
from dreamprm.flags import DefaultsHelpFormatter, add_flags, flag, values_of

DEFAULT_AGGREGATION = "mean_logit"
PROG = "python -m dreamprm.bestofn"


@dataclass(frozen=True)
class BestOfNConfig:
    # input
    prm: str = flag(None, "exported PRM directory (runs/<run>/export); a run folder holding export/ works too",
                    group="input", required=True)
    candidates: str = flag(None, "candidates file: JSON list (or JSONL) of questions with N chains each "
                           "(format: data/README.md)", group="input", required=True)
    image_root: str | None = flag(None, "folder image paths are relative to (default: the candidates file's "
                                  "folder)", group="input")
    # output
    output: str | None = flag(None, "selection JSON to write (default: beside --report as <report name>.selection."
                              "json, else in the PRM's run folder as bestofn/<candidates name>.json, so that two "
                              "PRMs scored on the same candidates never overwrite each other)", group="output")
    report: str | None = flag(None, "evaluation report JSON, written when labels or ground truth exist "
                              "(default: beside the selection, <selection name>.report.json)", group="output")
    # scoring
    aggregation: str | None = flag(None, "step scores -> chain score (default: the PRM's prm_config.json "
                                   f"'aggregation', else {DEFAULT_AGGREGATION})", group="scoring",
                                   choices=AGGREGATIONS)
    batch_size: int = flag(16, "candidate chains per forward pass (one row per chain with --packing chain, "
                           "per step prefix with none)", group="scoring")
    max_image_side: int = flag(512, "longest image side in pixels, as in training (--max_image_side)",
                               group="scoring")
    device: str = flag("auto", "'auto', 'cuda', 'cuda:N' or 'cpu'", group="scoring")
    packing: str = flag("chain", "'chain': all step prefixes of a chain in one sequence, scores as one by one "
                        "(data/README.md); 'none': one sequence per prefix", group="scoring",
                        choices=("none", "chain"))
    # report
    seed: int = flag(0, "seed of the candidate subsets drawn for N below the full N", group="report")
    subsamples: int = flag(8, "candidate subsets per question for each N below the full N "
                           "(all subsets when there are at most this many)", group="report")

    def validate(self) -> "BestOfNConfig":
        for name in ("batch_size", "subsamples", "max_image_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        if self.device not in ("auto", "cuda", "cpu") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device: must be 'auto', 'cuda', 'cuda:N' or 'cpu', got {self.device!r}")
        return self

    @property
    def output_path(self) -> Path:
        if self.output:
            return Path(self.output)
        if self.report:
            report = Path(self.report)
            return report.with_name(report.stem + ".selection.json")
        return run_folder(Path(self.prm)) / "bestofn" / f"{Path(self.candidates).stem}.json"

    @property
    def report_path(self) -> Path:
        return Path(self.report) if self.report else self.output_path.with_suffix(".report.json")


def run_folder(prm: Path) -> Path:
    """Where a PRM's results belong: the training run's folder for `runs/<run>/export` or `runs/<run>`,
    else the PRM folder itself."""
    if prm.name == "export":
        return prm.parent
    return prm


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Best-of-N selection and evaluation with an exported PRM.",
                                     formatter_class=DefaultsHelpFormatter)
    add_flags(parser, BestOfNConfig)
    # The deepspeed launcher appends --local_rank; ranks come from the environment.
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str = PROG) -> BestOfNConfig:
    """Flags -> validated, frozen config; a bad flag exits 2 with argparse's message."""
    parser = build_parser(prog)
    try:
        return values_of(BestOfNConfig, vars(parser.parse_args(argv))).validate()
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
