"""One adapter per backbone family: what the rest of the code asks instead of testing a model's type.

An adapter says how a chain is laid out for its backbone and how to call the body:
- the image: how the processor turns images into vision inputs, how one image placeholder of a
  chat text is expanded to its tokens, which tokens are image tokens;
- rotary positions of an unpadded token sequence: M-RoPE's three axes (Qwen2-VL, Qwen2.5-VL) or one;
- the body's forward: the inputs it takes, the positions in the shape it wants.

The chat layout itself (one user turn, or one turn per step for the generative head) is the
backbone's own chat template, applied by `dreamprm.data.chat`. Heads (`dreamprm.model.prm`) take
the body's hidden states and never know the backbone. `adapter_for(config)` is the only place a
model type is looked at, as transformers' Auto classes do.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch

from dreamprm.model.processor import ImageOnlyInternVLProcessor, ImageOnlyQwen2VLProcessor


class QwenVLAdapter:
    """Qwen2-VL and Qwen2.5-VL: dynamic-resolution patches with ``image_grid_thw``, M-RoPE positions
    (temporal, height, width), ``mm_token_type_ids`` in the forward (transformers 5.x)."""

    rotary_axes = 3
    processor_class = ImageOnlyQwen2VLProcessor

    def __init__(self, family: str):
        self.family = family

    def vision_inputs(self, processor: Any, images: list[Any]) -> dict[str, torch.Tensor]:
        """The image processor's tensors for these images, one image per packed row."""
        return dict(processor.image_processor(images=images, return_tensors="pt"))

    def image_placeholder(self, processor: Any) -> str:
        return processor.image_token

    def expand_image(self, processor: Any, text: str, vision: dict[str, torch.Tensor], image: int) -> str:
        """The chat text with its one image placeholder repeated once per merged patch of ``image``:
        the processor's own expansion."""
        return text.replace(processor.image_token, processor.replace_image_token(vision, image))

    def token_types(self, processor: Any, sequences: list[list[int]]) -> list[list[int]]:
        """0 for text, 1 for image tokens, per token."""
        return [list(t) for t in processor.create_mm_token_type_ids(sequences)]

    def positions(self, processor: Any, token_types: Sequence[int], vision: dict[str, torch.Tensor],
                  image: int) -> torch.Tensor:
        """[3, L] M-RoPE positions of one unpadded sequence whose image is ``image`` of ``vision``."""
        grid = vision["image_grid_thw"][image].tolist()
        return mrope_positions(token_types, [grid], processor.image_processor.merge_size)

    def image_rows(self, vision: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many rows of ``pixel_values`` each image takes (to select a row's image)."""
        return vision["image_grid_thw"].prod(dim=-1)

    def image_keys(self) -> tuple[str, ...]:
        """Batch keys that hold one entry per image (beside ``pixel_values``)."""
        return ("image_grid_thw",)

    def batch_image_rows(self, processor: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``image_rows`` of a batch the processor made (one image per row)."""
        return batch["image_grid_thw"].prod(dim=-1)

    def body_inputs(self, batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """The keyword arguments of the body's forward from a model batch."""
        out = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                     "mm_token_type_ids") if batch.get(k) is not None}
        if batch.get("position_ids") is not None:
            out["position_ids"] = batch["position_ids"].transpose(0, 1)  # (rows, 3, L) -> (3, rows, L)
        return out


class InternVLAdapter:
    """InternVL (transformers' ``InternVLForConditionalGeneration``, the ``-hf`` layout): fixed-size
    tiles, each ``image_seq_length`` context tokens between ``<img>`` and ``</img>``; a Qwen2 text
    model with 1-D rotary positions; the body takes ``pixel_values`` without grids."""

    rotary_axes = 1
    processor_class = ImageOnlyInternVLProcessor
    family = "internvl"

    def vision_inputs(self, processor: Any, images: list[Any]) -> dict[str, torch.Tensor]:
        out = dict(processor.image_processor(images=images, return_tensors="pt"))
        out["num_patches"] = torch.as_tensor(out["num_patches"]).reshape(-1)
        return out

    def image_placeholder(self, processor: Any) -> str:
        return processor.image_token

    def expand_image(self, processor: Any, text: str, vision: dict[str, torch.Tensor], image: int) -> str:
        """``<img>`` + the context token once per token of every tile + ``</img>``: the processor's own."""
        return text.replace(processor.image_token, processor.replace_image_token(vision, image))

    def token_types(self, processor: Any, sequences: list[list[int]]) -> list[list[int]]:
        image_ids = set(processor.image_token_ids)
        return [[int(t in image_ids) for t in s] for s in sequences]

    def positions(self, processor: Any, token_types: Sequence[int], vision: dict[str, torch.Tensor],
                  image: int) -> torch.Tensor:
        """[1, L]: 1-D rotary positions, image tokens counted like text."""
        return torch.arange(len(token_types)).unsqueeze(0)

    def image_rows(self, vision: dict[str, torch.Tensor]) -> torch.Tensor:
        return vision["num_patches"]

    def image_keys(self) -> tuple[str, ...]:
        return ()

    def batch_image_rows(self, processor: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # The processor drops num_patches: every tile is image_seq_length context tokens of its row.
        return (batch["input_ids"] == processor.image_token_id).sum(dim=1) // processor.image_seq_length

    def body_inputs(self, batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        out = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if batch.get(k) is not None}
        if batch.get("position_ids") is not None:
            out["position_ids"] = batch["position_ids"][:, 0]  # (rows, 1, L) -> (rows, L)
        return out


def mrope_positions(token_types: Sequence[int], grids: Sequence[Sequence[int]], spatial_merge_size: int) -> torch.Tensor:
    """Qwen2-VL's multimodal rotary positions [3, L] of one unpadded sequence.

    The rule of ``Qwen2VLModel.get_rope_index`` (transformers 5.x; Qwen2.5-VL's is the same for
    images): a text token takes the next position on all three axes; an image of grid (t, h, w)
    takes (start + t_i, start + h_i, start + w_i) over its merged grid, and the text after it
    continues at ``start + max(h, w) // merge``. ``token_types``: 0 text, 1 image (one run per
    image, images in ``grids`` order). Checked against the model's own function in the tests.
    """
    parts, current = [], 0
    grid_iter = iter(grids)
    for kind, run in itertools.groupby(token_types):
        length = len(list(run))
        if kind == 0:
            parts.append(torch.arange(current, current + length).expand(3, -1))
            current += length
            continue
        if kind != 1:
            raise ValueError(f"rope_positions: token type {kind} (video/audio) is not supported")
        t, h, w = (int(x) for x in next(grid_iter))
        h, w = h // spatial_merge_size, w // spatial_merge_size
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
        if grid.shape[1] != length:
            raise ValueError(f"rope_positions: an image run of {length} tokens does not match its grid {t}x{h}x{w}")
        parts.append(grid + current)
        current += max(h, w)
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)


# model_type (config.json) -> adapter. The one table that names backbones.
ADAPTERS: dict[str, Any] = {
    "qwen2_vl": QwenVLAdapter("qwen2_vl"),
    "qwen2_5_vl": QwenVLAdapter("qwen2_5_vl"),
    "internvl": InternVLAdapter(),
}


class UnsupportedBackbone(ValueError):
    """The model directory holds a backbone no adapter describes."""


def adapter_for(config: Any) -> Any:
    """The adapter of a model's (or a model directory's) Hugging Face config."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedBackbone(f"config.json: model_type: {model_type!r} has no PRM adapter; supported "
                                  f"backbones: {', '.join(sorted(ADAPTERS))} (dreamprm/model/adapters.py)")
    return ADAPTERS[model_type]
