"""The transformers engine: `model.generate` with sampling, one prompt at a time, its n completions
in one batch (`num_return_sequences`). The engine of CPU runs and CI; on a GPU it works but vLLM
is the fast path (no prefix cache here: each rollout re-reads its prompt)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from dreamprm.data.records import load_image
from dreamprm.labeling.engines import Completion, Prompt, Sampling, render

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TransformersEngine:
    name = "transformers"

    def __init__(self, model: str | Path, *, device: str = "cpu", dtype: str = "fp32", max_image_side: int = 512):
        from dreamprm.model.loading import load_backbone
        from dreamprm.model.processor import load_processor

        self.device = torch.device(device)
        self.processor = load_processor(model)
        self.model = load_backbone(model, dtype=DTYPES[dtype]).to(self.device).eval()
        self.max_image_side = max_image_side
        tokenizer = self.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], n: int, sampling: Sampling,
                 seeds: Sequence[int]) -> list[list[Completion]]:
        out = []
        for prompt, seed in zip(prompts, seeds):
            inputs = self.processor(text=[render(self.processor.tokenizer, prompt)],
                                    images=[load_image(prompt.image_path, self.max_image_side)],
                                    return_tensors="pt").to(self.device)
            # Seeded per prompt (not per call): a prompt's completions do not depend on its neighbours.
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            sample = sampling.temperature > 0
            ids = self.model.generate(
                **inputs, do_sample=sample, temperature=sampling.temperature if sample else None,
                top_p=sampling.top_p if sample else None, top_k=0 if sample else None,
                max_new_tokens=sampling.max_new_tokens, num_return_sequences=n,
                pad_token_id=self.pad_id, eos_token_id=self.eos_id)
            torch.random.set_rng_state(generator_state)
            new = ids[:, inputs["input_ids"].shape[1]:]
            out.append([Completion(text=self.processor.tokenizer.decode(row, skip_special_tokens=True),
                                   tokens=_generated_length(row, self.eos_id)) for row in new])
        return out

    def close(self) -> None:
        del self.model


def _generated_length(row: torch.Tensor, eos_id: int) -> int:
    """Tokens up to and including the first end-of-turn (what follows is padding)."""
    hits = (row == eos_id).nonzero()
    return int(hits[0, 0]) + 1 if len(hits) else int(row.numel())
