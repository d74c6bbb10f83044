"""End-of-run summary of the learned domain weights: ``domain_weights.json`` and a bar chart PNG
sorted high to low (like the paper's figure), drawn with PIL so no plotting library is needed."""
from __future__ import annotations

import json
import math
from pathlib import Path

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
                                 losses: list[float] | None = None) -> Path:
    """``instance_weights.jsonl``: one line per training record, lowest weight first: the records the
    upper level learned to distrust come first (a data-cleaning report; see the README). `losses`: the
    record's training loss at its last visit by an upper step (null: never visited), the plain
    loss-ranking baseline to compare the weights with."""
    path = Path(folder) / "instance_weights.jsonl"
    order = sorted(range(len(records)), key=lambda i: (weights[i], i))
    with open(path, "w", encoding="utf-8") as f:
        for i in order:
            r = records[i]
            f.write(json.dumps({"file": str(train_file), "record": int(r.source.rpartition("record ")[2]),
                                "id": r.chain_id, "sid": r.step_index, "domain": r.domain,
                                "weight": round(weights[i], 6),
                                **({} if losses is None else {"loss": None if math.isnan(losses[i]) else
                                                              round(losses[i], 6)})}) + "\n")
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
