"""Image-only Qwen2-VL processor and the one function that loads a processor for any entry point.

`Qwen2VLProcessor` looks up a video processor, which needs torchvision; PyPI's torchvision does
not import beside the CPU torch, and a PRM never sees video. The subclass here passes
`video_processor=None` and uses the PIL image processor, so nothing here requires torchvision.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer
from transformers.models.qwen2_vl import Qwen2VLProcessor

try:  # transformers >= 5.2x ships a PIL-only image processor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil as _ImageProcessor
except ImportError:  # pragma: no cover - older 5.x: the slow processor is PIL/numpy based
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor as _ImageProcessor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """A Qwen2-VL processor without the video half."""

    # No `video_processor` parameter: ProcessorMixin derives its sub-processors from this signature.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "ImageOnlyQwen2VLProcessor":
        # Built from parts so that a real Qwen2-VL checkout (whose preprocessor config names the
        # torchvision-backed class) and our tiny model load through the same path.
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        image_processor = _ImageProcessor.from_pretrained(str(path), **kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer,
                   chat_template=getattr(tokenizer, "chat_template", None))


def load_processor(path: str | Path, *, trust_remote_code: bool = False) -> ImageOnlyQwen2VLProcessor:
    """Load the processor that belongs to a model directory (or hub-style name in the local cache)."""
    return ImageOnlyQwen2VLProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
