"""Image-only processors (Qwen2-VL / Qwen2.5-VL, InternVL) and the one function that loads a
processor for any entry point.

`Qwen2VLProcessor` and `InternVLProcessor` look up a video processor, which needs torchvision; PyPI's
torchvision does not import beside the CPU torch, and a PRM never sees video. The subclasses here
pass `video_processor=None` and use the PIL image processors, so nothing here requires torchvision.
Which one a model directory takes is its adapter's choice (`dreamprm.model.adapters`).
"""
from __future__ import annotations

from pathlib import Path

import json

from transformers import AutoTokenizer
from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.internvl import InternVLProcessor
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


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """An InternVL processor without the video half (GOT-OCR2's PIL image processor: 448-pixel tiles)."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "ImageOnlyInternVLProcessor":
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        image_processor = GotOcr2ImageProcessorPil.from_pretrained(str(path), **kwargs)
        # Image tokens per tile: the model's own number (config.json, else the saved processor's).
        for name in ("config.json", "processor_config.json"):
            if (Path(path) / name).is_file():
                seq = json.loads((Path(path) / name).read_text()).get("image_seq_length", 256)
                break
        else:
            seq = 256
        return cls(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=seq,
                   chat_template=getattr(tokenizer, "chat_template", None))


def load_processor(path: str | Path, *, trust_remote_code: bool = False) -> ImageOnlyQwen2VLProcessor | ImageOnlyInternVLProcessor:
    """Load the processor that belongs to a model directory (or hub-style name in the local cache):
    the one its backbone's adapter names. A folder of processor files only (no config.json) is read
    by the class its processor_config.json names, Qwen2-VL's by default."""
    from transformers import AutoConfig

    from dreamprm.model.adapters import adapter_for  # the adapters name these processor classes
    if (Path(path) / "config.json").is_file() or not Path(path).exists():
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
        cls = adapter_for(config).processor_class
    else:
        saved = Path(path) / "processor_config.json"
        name = json.loads(saved.read_text()).get("processor_class") if saved.is_file() else None
        cls = ImageOnlyInternVLProcessor if name == ImageOnlyInternVLProcessor.__name__ else ImageOnlyQwen2VLProcessor
    return cls.from_pretrained(path, trust_remote_code=trust_remote_code)
