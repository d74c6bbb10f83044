"""A tiny, randomly initialised vision-language model with a locally trained tokenizer: the offline
stand-in for `Qwen/Qwen2-VL-2B-Instruct` (``--arch qwen2_vl``, the default),
`Qwen/Qwen2.5-VL-3B-Instruct` (``--arch qwen2_5_vl``) or `OpenGVLab/InternVL3-1B-hf` (``--arch internvl``)
that tests and the demo use.

It is the real `*ForConditionalGeneration` architecture (vision tower, merger, M-RoPE text decoder)
at a few hundred thousand parameters, saved with `save_pretrained` so that the same loading code
reads it as a real checkpoint directory. "+" and "-" are single tokens of its tokenizer, so the
generative head can judge with it.

    python -m dreamprm.model.tiny --out runs/tiny-qwen2vl
    python -m dreamprm.model.tiny --arch qwen2_5_vl --out runs/tiny-qwen2_5vl
    python -m dreamprm.model.tiny --arch internvl --out runs/tiny-internvl
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForImageTextToText, InternVLConfig, InternVLForConditionalGeneration,
                          PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)
from transformers.models.got_ocr2 import GotOcr2ImageProcessorPil

from dreamprm.model.processor import ImageOnlyInternVLProcessor, ImageOnlyQwen2VLProcessor, _ImageProcessor

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's chat template, reduced to what a PRM needs: text and image parts, optional system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "How many red shapes are in the image? Step 1: I count the red circles. Step 2: 2 + 1 = 3.",
    "Are there more circles than squares? Final answer: yes. Final answer: no.",
    "Step 1: There are 3 blue squares and 2 green circles. Step 2: So the total is 5.",
    "Question: What colour is the largest shape? Answer the question step by step.",
    "0 1 2 3 4 5 6 7 8 9 10 + - = red green blue circle square shape shapes image count total",
]


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a small built-in corpus and add Qwen's special tokens."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


ARCHES = ("qwen2_vl", "qwen2_5_vl", "internvl")
# InternVL's image tokens, named as transformers' InternVLProcessor reads them from the tokenizer.
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
# InternVL's chat template renders an image part as the context token; the processor expands it.
INTERNVL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n")
INTERNVL_TILE = 56  # pixels per tile side: (56 / 14)^2 patches, pixel-shuffled by 0.5 -> 4 tokens per tile


def build_internvl_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer with InternVL's image tokens and chat template."""
    base = build_tokenizer()
    base.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:] + list(INTERNVL_TOKENS.values())})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", extra_special_tokens=INTERNVL_TOKENS,
                                        padding_side="right")
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    return tokenizer


def build_internvl_config(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 64, num_layers: int = 2) -> InternVLConfig:
    """InternVL3's -hf architecture at toy scale: an InternViT tower, the pixel-shuffle MLP projector and
    a Qwen2 text model with 1-D rotary positions."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden_size,
                intermediate_size=hidden_size * 2, num_hidden_layers=num_layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=[INTERNVL_TILE, INTERNVL_TILE], patch_size=[14, 14])
    tokens_per_tile = int((INTERNVL_TILE // 14) ** 2 * 0.5 ** 2)
    return InternVLConfig(vision_config=vision, text_config=text, image_seq_length=tokens_per_tile,
                          image_token_id=tokenizer.convert_tokens_to_ids(INTERNVL_TOKENS["context_image_token"]),
                          downsample_ratio=0.5, tie_word_embeddings=False)


def build_config(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 64, num_layers: int = 2,
                 arch: str = "qwen2_vl") -> Qwen2VLConfig | Qwen2_5_VLConfig:
    """Qwen2-VL's (or Qwen2.5-VL's) architecture at toy scale; token ids come from the tokenizer."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    num_heads = 4
    head_dim = hidden_size // num_heads
    # M-RoPE splits head_dim/2 rotary frequencies into (temporal, height, width) sections.
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=2,
        max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    if arch == "qwen2_5_vl":
        # Qwen2.5-VL's tower: windowed attention with full-attention blocks, an MLP merger to out_hidden_size.
        vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=hidden_size,
                      fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        config_class = Qwen2_5_VLConfig
    elif arch == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=hidden_size,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        config_class = Qwen2VLConfig
    else:
        raise ValueError(f"--arch must be one of {', '.join(ARCHES)}, got {arch!r}")
    return config_class(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_qwen2vl(out_dir: str | Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                       arch: str = "qwen2_vl") -> Path:
    """Build and save a tiny random Qwen2-VL (Qwen2.5-VL, InternVL) plus its processor; returns the directory."""
    out_dir = Path(out_dir)
    if arch == "internvl":
        return _build_tiny_internvl(out_dir, seed=seed, hidden_size=hidden_size, num_layers=num_layers)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers, arch=arch)
    torch.manual_seed(seed)
    model_class = Qwen2_5_VLForConditionalGeneration if arch == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = model_class(config)
    # Small images keep the demo fast: at most 224x224 reaches the vision tower.
    image_processor = _ImageProcessor(min_pixels=28 * 28, max_pixels=224 * 224)
    processor = ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=CHAT_TEMPLATE)
    return _save(out_dir, model, processor, tokenizer)


def _save(out_dir: Path, model, processor, tokenizer) -> Path:
    """A model folder as `from_pretrained` and the processor loaders read it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _build_tiny_internvl(out_dir: Path, *, seed: int, hidden_size: int, num_layers: int) -> Path:
    tokenizer = build_internvl_tokenizer()
    config = build_internvl_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    # One tile per image (no cropping into several): small and fast, as the Qwen tiny model's images.
    image_processor = GotOcr2ImageProcessorPil(size={"height": INTERNVL_TILE, "width": INTERNVL_TILE},
                                               crop_to_patches=False)
    processor = ImageOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                           image_seq_length=config.image_seq_length,
                                           chat_template=INTERNVL_CHAT_TEMPLATE)
    return _save(out_dir, model, processor, tokenizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen2_vl", choices=ARCHES, help="backbone architecture")
    parser.add_argument("--out", default="runs/tiny-qwen2vl", help="directory to write the model and processor to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    args = parser.parse_args(argv)
    path = build_tiny_qwen2vl(args.out, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.num_layers,
                              arch=args.arch)
    n = sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(path).parameters())
    print(f"wrote a tiny {args.arch} ({n:,} parameters) to {path}")


if __name__ == "__main__":
    main()
