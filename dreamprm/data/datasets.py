"""CPU-only datasets and the collator that turns records into model batches.

Datasets load images and return plain Python objects; the collator runs the processor and builds
tensors. Nothing here touches a device: the trainer moves batches in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from dreamprm.data.chat import ChainLayout
from dreamprm.data.records import MetaRecord, TrainRecord, load_image
from dreamprm.model.adapters import ADAPTERS


class TrainDataset(Dataset):
    """One item per training record: (image, text, domain index, accuracy, chain group, record index).

    ``groups`` (`dreamprm.data.packing.group_chain_records`) marks the records of one chain that
    nest; the packed collator scores the records of a group that share a batch in one row.
    """

    def __init__(self, records: list[TrainRecord], domains: dict[str, int], max_image_side: int = 512,
                 groups: list[int | None] | None = None):
        self.records = records
        self.domains = domains
        self.max_image_side = max_image_side
        self.groups = groups

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        return {"image": load_image(r.image_path, self.max_image_side), "texts": [r.text],
                "domain": self.domains[r.domain], "target": r.accuracy, "record": index,
                "group": None if self.groups is None else self.groups[index]}

    def lengths(self) -> list[int]:
        """A cheap length proxy (characters) for length grouping."""
        return [len(r.text) for r in self.records]


class MetaDataset(Dataset):
    """One item per meta chain: (image, all its step prefixes, correctness label, question index).

    The question index numbers the distinct ``question_id``s in order of first appearance; a chain
    without one is a question of its own."""

    def __init__(self, records: list[MetaRecord], max_image_side: int = 512):
        self.records = records
        self.max_image_side = max_image_side
        index: dict[str, int] = {}
        self.questions = [index.setdefault(r.question_id, len(index)) if r.question_id is not None else -1
                          for r in records]
        self.questions = [q if q >= 0 else len(index) + i for i, q in enumerate(self.questions)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[index]
        return {"image": load_image(r.image_path, self.max_image_side), "texts": list(r.prefixes),
                "domain": -1, "target": r.label, "question": self.questions[index]}

    def question_units(self) -> list[list[int]] | None:
        """The indices of each question's chains, in order of first appearance; None when every
        question has one chain (nothing to keep together)."""
        units: dict[int, list[int]] = {}
        for i, q in enumerate(self.questions):
            units.setdefault(q, []).append(i)
        return list(units.values()) if len(units) < len(self.records) else None

    def lengths(self) -> list[int]:
        return [sum(len(p) for p in r.prefixes) for r in self.records]


def score_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of every row, whichever side the padding is on."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


@dataclass
class PRMCollator:
    """Builds one model batch from items; every text of an item is scored with the item's image.

    The output has the processor's tensors plus ``score_index`` [rows], ``item_index`` [rows]
    (which item a row belongs to: the chain, for meta batches), ``domain``, ``target`` and
    ``record`` [items] (the training record's index in its file; -1 for other items).
    ``layout`` says how a text becomes a chat text (one user turn, or one turn per step for the
    generative head: `dreamprm.data.chat`); ``adapter`` is the backbone's (`dreamprm.model.adapters`).
    """

    processor: Any
    layout: ChainLayout = field(default_factory=ChainLayout)
    adapter: Any = field(default_factory=lambda: ADAPTERS["qwen2_vl"])

    def chat_text(self, text: str) -> str:
        # Ends with the generation prompt: the score is read at the last token, where the
        # assistant's answer (the generative head: the judgement) begins.
        return self.layout.chat_text(self.processor.tokenizer, text)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts, images, item_index = [], [], []
        for i, item in enumerate(items):
            for text in item["texts"]:
                texts.append(self.chat_text(text))
                images.append(item["image"])
                item_index.append(i)
        # Right padding: a 1-D rotary model (InternVL) numbers positions from the row's first token,
        # so left padding would shift them away from the unpadded sequence's.
        batch = dict(self.processor(text=texts, images=images, padding=True, padding_side="right", return_tensors="pt"))
        batch["image_rows"] = self.adapter.batch_image_rows(self.processor, batch)
        batch["score_index"] = score_positions(batch["attention_mask"])
        batch["item_index"] = torch.tensor(item_index, dtype=torch.long)
        batch.update(item_tensors(items))
        return batch


def item_tensors(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The per-item fields of a batch: ``domain``, ``target``, ``record`` and, for meta chains,
    ``question`` (`MetaDataset`)."""
    out = {"domain": torch.tensor([item["domain"] for item in items], dtype=torch.long),
           "target": torch.tensor([item["target"] for item in items], dtype=torch.float32),
           "record": record_indices(items)}
    if "question" in items[0]:
        out["question"] = torch.tensor([item["question"] for item in items], dtype=torch.long)
    return out


def select_images(batch: dict[str, torch.Tensor], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pixel_values`` (every image's rows back to back) and the per-image keys of the given images.

    ``image_rows`` [images] (the collators add it from the backbone's adapter) says how many rows of
    ``pixel_values`` each image takes; batches without it are Qwen-style (``image_grid_thw``)."""
    counts = batch["image_rows"] if "image_rows" in batch else batch["image_grid_thw"].prod(dim=-1)
    counts = counts.cpu()
    starts = torch.cumsum(counts, 0) - counts
    out = {"pixel_values": torch.cat([batch["pixel_values"][starts[r]:starts[r] + counts[r]] for r in images.tolist()])}
    for key in ("image_grid_thw", "image_rows"):
        if key in batch:
            out[key] = batch[key][images.to(batch[key].device)]
    return out


def record_indices(items: list[dict[str, Any]]) -> torch.Tensor:
    """Each item's training-record index (-1 for meta chains and candidates)."""
    return torch.tensor([item.get("record", -1) for item in items], dtype=torch.long)


def select_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sub-batch of the given rows of a training batch (one image per row, one item per row).

    ``pixel_values`` holds every image's patches back to back; ``image_grid_thw`` says how many
    each image has, which locates a row's patches. In a packed batch ``rows`` are records.
    """
    if "score_row" in batch:  # packed: several records per row
        from dreamprm.data.packing import select_packed_records
        return select_packed_records(batch, rows)
    rows = rows.to(torch.long).cpu()
    out = {k: v[rows] for k, v in batch.items()
           if k not in ("pixel_values", "image_grid_thw", "image_rows", "item_index", "domain", "target", "record")}
    out.update(select_images(batch, rows))
    out["item_index"] = torch.arange(rows.numel())
    out["domain"] = batch["domain"][rows]
    out["target"] = batch["target"][rows]
    if "record" in batch:
        out["record"] = batch["record"][rows]
    return out
