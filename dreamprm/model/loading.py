"""Building the PRM for training and reading/writing the exported PRM.

Export layout (``<weights_path>/export``), loadable without DeepSpeed:
- ``config.json`` + ``model.safetensors``: the backbone, a normal Hugging Face model directory;
- ``score_head.safetensors``: the scalar head (none for the generative head: the backbone's own
  language-model head judges);
- ``prm_config.json``: head type, judgement tokens (generative), base model, domain mapping, learned
  domain weights, aggregation;
- the processor files (tokenizer, chat template, image processor).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.utils import logging as hf_logging

from dreamprm.config import ConfigError
from dreamprm.model.export_files import BACKBONE_WEIGHTS, HEAD_FILE, PRM_CONFIG
from dreamprm.model.adapters import UnsupportedBackbone, adapter_for
from dreamprm.model.judge import JUDGE_DEFAULT, JudgeTokenError, resolve_judge_tokens
from dreamprm.model.prm import HeadType, ProcessRewardModel
from dreamprm.model.processor import ImageOnlyQwen2VLProcessor, load_processor

hf_logging.disable_progress_bar()


def resolve_model_dir(name: str | Path) -> str:
    """A local model directory for a path or a hub-style name (``Qwen/Qwen2-VL-2B-Instruct``).

    A hub-style name is looked up in the local Hugging Face cache only: nothing is downloaded.
    """
    path = Path(name)
    if not path.exists() and "/" in str(name) and not str(name).startswith(("/", ".")):
        try:
            from huggingface_hub import snapshot_download
            path = Path(snapshot_download(str(name), local_files_only=True))
        except Exception:  # not in the cache: reported below as a missing directory
            pass
    if not path.exists():
        raise ConfigError(f"--reward_model {name}: no such directory, and not in the local Hugging Face cache "
                          "(nothing is downloaded: pass a local Qwen2-VL directory, or 'tiny' for the offline "
                          "tiny model)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"--reward_model {name}: config.json is missing, so this is not a model directory")
    # Absolute and normalised (no ".."): a checkpoint records it, and a resume may spell it differently.
    return os.path.abspath(path)


def load_backbone(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                  attn_implementation: str | None = None) -> torch.nn.Module:
    """A Qwen2-VL / Qwen2.5-VL *ForConditionalGeneration from a local directory."""
    path = resolve_model_dir(path)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # use_kernels=False: transformers >= 5.2x otherwise swaps layers for kernels fetched from the Hub on
    # CUDA (a download, a failure on offline nodes, and other numerics than the ones measured here).
    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                                       local_files_only=True, use_kernels=False, **extra)


def judge_ids_for(path: str | Path, head: str, judge_tokens: str = JUDGE_DEFAULT,
                  trust_remote_code: bool = False) -> tuple[int, int] | None:
    """The judgement token ids of a generative head, resolved from the model directory's tokenizer
    (None for the scalar heads)."""
    if head != "generative":
        return None
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    try:
        return resolve_judge_tokens(tokenizer, judge_tokens, source=f"the tokenizer of {path}")
    except JudgeTokenError as err:  # a user's choice of flag and model: exit 2 with the reason
        raise ConfigError(str(err)) from err


def check_backbone(path: str | Path, head: str, judge_tokens: str = JUDGE_DEFAULT,
                   trust_remote_code: bool = False) -> tuple[int, int] | None:
    """Refuse, before any weight loads, a backbone without an adapter or (generative head) a tokenizer
    that cannot judge; returns the judgement token ids (None for the scalar heads)."""
    try:
        adapter_for(AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True))
    except UnsupportedBackbone as err:
        raise ConfigError(f"--reward_model {path}: {err}") from err
    return judge_ids_for(path, head, judge_tokens, trust_remote_code)


def build_prm(path: str | Path, head: HeadType, *, seed: int, dtype: torch.dtype = torch.float32,
              trust_remote_code: bool = False, gradient_checkpointing: bool = False,
              attn_implementation: str | None = None, judge_tokens: str = JUDGE_DEFAULT) -> ProcessRewardModel:
    path = resolve_model_dir(path)
    judge_ids = check_backbone(path, head, judge_tokens, trust_remote_code)
    backbone = load_backbone(path, dtype=dtype, trust_remote_code=trust_remote_code,
                             attn_implementation=attn_implementation)
    if gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # The head is initialised from the seed alone, so every rank and every world size agree.
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = ProcessRewardModel(backbone, head, judge_ids)
    torch.random.set_rng_state(generator_state)
    return model.to(dtype)


def export_prm(out_dir: str | Path, state_dict: dict[str, torch.Tensor], model: ProcessRewardModel,
               processor: ImageOnlyQwen2VLProcessor, meta: dict[str, Any]) -> Path:
    """Write the exported PRM from a full (gathered) state dict of the PRM."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone = {k[len("backbone."):]: v.detach().clone().contiguous() for k, v in state_dict.items() if k.startswith("backbone.")}
    head = {k[len("score_head."):]: v.detach().clone().contiguous() for k, v in state_dict.items() if k.startswith("score_head.")}
    model.backbone.config.save_pretrained(out_dir)
    save_file(backbone, str(out_dir / BACKBONE_WEIGHTS), metadata={"format": "pt"})
    if head:  # the generative head has no parameters of its own
        save_file(head, str(out_dir / HEAD_FILE), metadata={"format": "pt"})
    processor.save_pretrained(out_dir)
    processor.tokenizer.save_pretrained(out_dir)
    judge = {"judge_ids": list(model.judge_ids)} if model.judge_ids is not None else {}
    (out_dir / PRM_CONFIG).write_text(json.dumps({**meta, **judge, "head": model.head_type}, indent=2, sort_keys=True))
    return out_dir


def load_exported_prm(path: str | Path, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> tuple[ProcessRewardModel, ImageOnlyQwen2VLProcessor, dict]:
    """Load an exported PRM without DeepSpeed: (model in eval mode, processor, prm_config)."""
    path = Path(path)
    if not (path / PRM_CONFIG).is_file():
        raise FileNotFoundError(f"{path}: not an exported PRM ({PRM_CONFIG} is missing)")
    meta = json.loads((path / PRM_CONFIG).read_text())
    if meta["head"] != "generative" and not (path / HEAD_FILE).is_file():
        raise FileNotFoundError(f"{path}: not an exported PRM ({HEAD_FILE} is missing)")
    backbone = load_backbone(path, dtype=dtype)
    judge = tuple(meta["judge_ids"]) if meta["head"] == "generative" else None
    model = ProcessRewardModel(backbone, meta["head"], judge)
    if model.score_head is not None:
        model.score_head.load_state_dict(load_file(str(path / HEAD_FILE)))
    return model.to(device=device, dtype=dtype).eval(), load_processor(path), meta
