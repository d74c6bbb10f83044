"""End-of-run summaries: the learned domain weights (``domain_weights.json`` and a bar chart PNG
sorted high to low, like the paper's figure, drawn with PIL so no plotting library is needed), the
instance-weight report, and ``summary.md``, the run on one page."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont


def write_domain_weight_summary(folder: str | Path, weights: dict[str, float], logits: list[float]) -> tuple[Path, Path]:
    folder = Path(folder)
    ranked = sorted(weights.items(), key=lambda kv: kv[1], reverse=True)
    json_path = folder / "domain_weights.json"
    json_path.write_text(json.dumps({"weights": dict(ranked), "logits": dict(zip(weights, logits)),
                                     "order": [name for name, _ in ranked]}, indent=2))
    png_path = folder / "domain_weights.png"
    draw_bar_chart(ranked, png_path)
    return json_path, png_path


def write_instance_weight_report(folder: str | Path, train_file: str | Path, records: list, weights: list[float],
                                 losses: list[float] | None = None, predictions: list[float] | None = None) -> Path:
    """``instance_weights.jsonl``: one line per training record, lowest weight first: the records the
    upper level learned to distrust come first (a data-cleaning report; see the README). Beside the
    weight, the plain baselines to compare it with: `loss`, the record's training loss at its last visit
    by an upper step, and `prediction`, the PRM's predicted accuracy sigmoid(z) at that visit, next to
    `mc`, the record's Monte Carlo accuracy (their distance is the second baseline); null: never visited."""
    path = Path(folder) / "instance_weights.jsonl"
    order = sorted(range(len(records)), key=lambda i: (weights[i], i))

    def measured(values: list[float] | None, i: int, name: str) -> dict[str, float | None]:
        return {} if values is None else {name: None if math.isnan(values[i]) else round(values[i], 6)}

    with open(path, "w", encoding="utf-8") as f:
        for i in order:
            r = records[i]
            f.write(json.dumps({"file": str(train_file), "record": int(r.source.rpartition("record ")[2]),
                                "id": r.chain_id, "sid": r.step_index, "domain": r.domain,
                                "weight": round(weights[i], 6), **measured(losses, i, "loss"),
                                **({} if predictions is None else {"mc": r.accuracy}),
                                **measured(predictions, i, "prediction")}) + "\n")
    return path


def draw_bar_chart(ranked: list[tuple[str, float]], path: Path, width: int = 720) -> None:
    font = ImageFont.load_default()
    row, left, right, top = 34, 170, 80, 50
    height = top + row * len(ranked) + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 15), "Learned domain weights (mean 1)", fill="black", font=font)
    top_value = max([w for _, w in ranked] + [1.0])
    span = width - left - right
    one = left + span / top_value  # where weight 1.0 (uniform) lies
    for i, (name, weight) in enumerate(ranked):
        y = top + i * row
        draw.text((10, y + 8), name[:24], fill="black", font=font)
        x_end = left + span * weight / top_value
        draw.rectangle([left, y + 4, x_end, y + row - 6], fill=(66, 133, 244) if weight >= 1 else (219, 68, 55))
        draw.text((x_end + 6, y + 8), f"{weight:.3f}", fill="black", font=font)
    draw.line([one, top - 6, one, height - 24], fill=(90, 90, 90), width=1)
    draw.text((one - 12, height - 22), "1.0", fill=(90, 90, 90), font=font)
    image.save(path)


@dataclass
class RunSummary:
    """What `write_run_summary` reports; every number measured by the trainer (rank 0)."""
    steps: int
    seconds: float  # wall time of this process's training loop (a resumed run: since the resume)
    samples_per_s: float
    weights: dict[str, float]
    eval_seconds: float = 0.0
    final_eval: tuple[int, dict[str, float]] | None = None  # (step, metrics)
    best: dict[str, Any] | None = None  # checkpoint.Checkpointer.best
    lowest_records: list[dict[str, Any]] | None = None  # instance_weights.jsonl's first lines
    export: str | None = None  # the export folder, None without --export
    export_step: int | None = None
    meta: MetaTrace | None = None  # the meta objective over this process's upper steps (None: --baseline)


META_WINDOW = 20  # upper steps averaged at each end of the run for summary.md


class MetaTrace:
    """The meta loss and pair accuracy of the first and last META_WINDOW upper steps whose meta batch
    could be scored (a pairwise batch without a right-wrong pair is left out): whether the PRM learned
    to rank the meta set, beside the weights it moved."""

    def __init__(self, objective: str, chance: float):
        self.objective, self.chance = objective, chance
        self.first: list[tuple[float, float | None]] = []
        self.last: list[tuple[float, float | None]] = []

    def add(self, loss: float, pair_accuracy: float | None) -> None:
        if len(self.first) < META_WINDOW:
            self.first.append((loss, pair_accuracy))
        self.last = (self.last + [(loss, pair_accuracy)])[-META_WINDOW:]

    def rows(self) -> list[tuple[str, float, float | None]]:
        """(which upper steps, mean meta loss, mean pair accuracy or None)."""
        def mean(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return sum(known) / len(known) if known else None
        return [(f"{name} {len(part)}", mean([l for l, _ in part]), mean([a for _, a in part]))
                for name, part in (("first", self.first), ("last", self.last)) if part]


def write_run_summary(folder: str | Path, s: RunSummary) -> tuple[str, Path]:
    """``summary.md`` in `folder`; returns (its text, its path). The weight picture is linked, not inlined."""
    lines = ["# DreamPRM run summary", "",
             f"- steps: {s.steps}", f"- time: {s.seconds:.1f} s", f"- training samples/s: {s.samples_per_s:.2f}"]
    if s.final_eval is not None:
        share = 100 * s.eval_seconds / s.seconds if s.seconds > 0 else 0.0
        lines.append(f"- evaluation time: {s.eval_seconds:.1f} s ({share:.1f}% of the run)")
        step, values = s.final_eval
        lines += ["", "## Best-of-N evaluation", "", "| metric | final (step " + f"{step}) |"
                  + (" best |" if s.best else ""), "|---|---|" + ("---|" if s.best else "")]
        for name, value in values.items():
            if name == "seconds":
                continue
            best = ""
            if s.best:
                best = f" {s.best['value']:.4f} (step {s.best['step']}) |" if name == s.best["metric"] else " |"
            lines.append(f"| {name} | {value:.4f} |{best}")
        if s.best:
            lines += ["", f"Best checkpoint by {s.best['metric']}: checkpoints/{s.best['folder']} "
                      f"({s.best['value']:.4f} at step {s.best['step']})"]
    lines += ["", "## Domain weights", "", "| domain | weight |", "|---|---|"]
    lines += [f"| {name} | {w:.4f} |" for name, w in sorted(s.weights.items(), key=lambda kv: kv[1], reverse=True)]
    lines += ["", "![domain weights](domain_weights.png)"]
    if s.meta is not None and s.meta.first:
        lines += ["", f"## Meta objective ({s.meta.objective}; a PRM that scores every chain alike: {s.meta.chance:.3f})", "",
                  "| upper steps | meta loss | pair accuracy (0.5: chance) |", "|---|---|---|"]
        lines += [f"| {name} | {loss:.3f} | {'' if acc is None else f'{acc:.3f}'} |" for name, loss, acc in s.meta.rows()]
        lines += ["", "The weights are only as good as the meta objective's ranking: on 24 new runs of the quality "
                  "benchmark every run of the defaults whose weights ended misordered had a pairwise meta loss of "
                  "0.62-0.69 at the end (benchmarks/quality/RESULTS_scan.md)."]
    if s.lowest_records:
        lines += ["", "## Lowest-weighted training records", "", "(all of them, lowest first: instance_weights.jsonl)",
                  "", "| weight | domain | record | id | step |", "|---|---|---|---|---|"]
        lines += [f"| {r['weight']:.4f} | {r['domain']} | {r['file']}:record {r['record']} | {r['id']} | {r['sid']} |"
                  for r in s.lowest_records]
    lines += ["", "## Export", ""]
    lines.append(f"{s.export} (the PRM of step {s.export_step})" if s.export else "none (--no-export)")
    text = "\n".join(lines) + "\n"
    path = Path(folder) / "summary.md"
    path.write_text(text, encoding="utf-8")
    return text, path
