"""The process reward model: a Qwen2-VL backbone plus a scalar score head.

The model returns the score's logit for every row; the score itself is ``sigmoid(logit)``. Keeping
logits lets the meta aggregation ``sigmoid(mean_i logit(s_i))`` avoid a logit of a rounded sigmoid.

Heads:
- ``logits`` (the original's): ``Linear(vocab_size, 1)`` on the language-model logits of the
  scored position only (the original materialised ``[batch, seq, vocab]``).
- ``hidden``: ``Linear(hidden_size, 1)`` on the final hidden state of the scored position; the
  language-model head is frozen and never run.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

HeadType = Literal["logits", "hidden"]
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


class ProcessRewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: HeadType = "logits"):
        super().__init__()
        if head not in ("logits", "hidden"):
            raise ValueError(f"--head must be 'logits' or 'hidden', got {head!r}")
        self.backbone = backbone  # a *ForConditionalGeneration: .model (VL body) and .lm_head
        self.head_type = head
        text_config = getattr(backbone.config, "text_config", backbone.config)
        width = text_config.vocab_size if head == "logits" else text_config.hidden_size
        self.score_head = nn.Linear(width, 1)
        if head == "hidden":
            backbone.lm_head.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_index: torch.Tensor,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                mm_token_type_ids: torch.Tensor | None = None, **_: torch.Tensor) -> torch.Tensor:
        """Score logits, shape [rows]."""
        extra = {"mm_token_type_ids": mm_token_type_ids} if mm_token_type_ids is not None else {}
        hidden = self.backbone.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                     image_grid_thw=image_grid_thw, use_cache=False, **extra).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, score_index]  # (rows, hidden)
        if self.head_type == "logits":
            last = self.backbone.lm_head(last)  # (rows, vocab): one position, not the whole sequence
        return self.score_head(last.to(self.score_head.weight.dtype)).squeeze(-1).float()
