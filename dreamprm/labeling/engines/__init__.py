"""One engine interface for the policy model: n sampled continuations of each prompt.

`Engine.generate(prompts, n, sampling, seeds)` returns, for each prompt, n `Completion`s. A prompt
is the user turn (image + text) and the start of the assistant turn already written (`prefix`: a
step prefix for a rollout, "Step 1:" for a fresh chain); the engine renders it with the model's own
chat template (`render`). Each prompt has its own seed, so its completions do not depend on which
other prompts share the call: the same seed and engine give the same text.

    transformers   `generate` (CPU, CI, any GPU); engines/hf.py
    vllm           vLLM with prefix caching and tensor parallelism (the fast path, extra `vllm`);
                   engines/vllm_engine.py
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

ENGINES = ("transformers", "vllm")


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int


@dataclass(frozen=True)
class Prompt:
    user_text: str
    image_path: Path
    prefix: str = ""  # the assistant's text so far; the completion continues it


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int  # generated tokens (the end-of-turn token included when it was sampled)


class Engine(Protocol):
    name: str

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: Sampling,
                 seeds: Sequence[int]) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def render(tokenizer: Any, prompt: Prompt) -> str:
    """The prompt text in the model's chat template, the image as one placeholder (the processor or
    vLLM expands it to the image's tokens), the assistant turn opened and continued by `prefix`."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.user_text}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + prompt.prefix


def build_engine(name: str, model: str | Path, *, device: str = "cpu", dtype: str = "fp32",
                 tensor_parallel_size: int = 1, seed: int = 0, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_image_side: int = 512) -> Engine:
    """The engine called `name` with the policy model at `model` (a local directory)."""
    if name == "transformers":
        from dreamprm.labeling.engines.hf import TransformersEngine
        return TransformersEngine(model, device=device, dtype=dtype, max_image_side=max_image_side)
    if name == "vllm":
        from dreamprm.labeling.engines.vllm_engine import VLLMEngine
        return VLLMEngine(model, dtype=dtype, tensor_parallel_size=tensor_parallel_size, seed=seed,
                          max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                          max_image_side=max_image_side)
    raise ValueError(f"unknown engine {name!r} (one of {', '.join(ENGINES)})")
