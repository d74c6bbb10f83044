"""The process reward model: a vision-language backbone plus a score head.

The model returns the score's logit for every row; the score itself is ``sigmoid(logit)``. Keeping
logits lets the meta aggregation ``sigmoid(mean_i logit(s_i))`` avoid a logit of a rounded sigmoid.

Heads:
- ``logits`` (the original's): ``Linear(vocab_size, 1)`` on the language-model logits of the
  scored position only (the original materialised ``[batch, seq, vocab]``).
- ``hidden``: ``Linear(hidden_size, 1)`` on the final hidden state of the scored position; the
  language-model head is frozen and never run.
- ``generative``: no new parameters; the language-model head reads the judgement at the scored
  position (the generation prompt after a step, `dreamprm.data.chat`) and the score's logit is
  ``log P(+) - log P(-)`` = ``lm_logit(+) - lm_logit(-)`` (the softmax's normaliser cancels), so
  ``sigmoid(logit)`` is P(+) over {+, -} and every aggregation, objective and report sees a logit.

The backbone is called through its adapter (`dreamprm.model.adapters`): the heads see hidden states
and language-model logits only, never the backbone's type.

Packed batches (`dreamprm.data.packing`) score several positions per row: ``score_row`` says which
row each score is read from, ``position_ids`` carries every token's rotary positions and
``packed_visible`` / ``packed_branch_start`` become the attention mask. Attention backends:
- ``sdpa`` (the default, chosen on CPU and CUDA): takes the boolean [rows, 1, L, L] mask. On CPU it
  ran the tiny model's packed rows faster than eager (0.34 vs 0.40 s). On CUDA a mask rules out
  SDPA's flash kernel and PyTorch dispatches to its memory-efficient kernel (not yet measured here).
- ``eager``: takes it as an additive float mask (0 / dtype minimum).
- ``flash_attention_2/3`` cannot express a per-token visibility (only whole sequences via
  ``cu_seqlens``) and ``flex_attention`` would need a BlockMask: both are refused with packing.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dreamprm.model.adapters import adapter_for

HeadType = Literal["logits", "hidden", "generative"]
HEADS = ("logits", "hidden", "generative")
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
PACKED_INPUTS = ("position_ids", "packed_visible", "packed_branch_start", "score_row")
MODEL_KEYS = MODEL_INPUTS + PACKED_INPUTS + ("score_index",)  # every batch key the PRM's forward reads
MASKED_ATTENTION = ("sdpa", "eager")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a collated batch that `ProcessRewardModel.forward` takes."""
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def packed_attention_mask(visible: torch.Tensor, branch_start: torch.Tensor, implementation: str,
                          dtype: torch.dtype) -> torch.Tensor:
    """The [rows, 1, L, L] mask of packed rows: query q sees key k iff k < visible[q] or
    branch_start[q] <= k <= q (see `dreamprm.data.packing`). Boolean for SDPA (True = attend),
    additive for eager attention."""
    if implementation not in MASKED_ATTENTION:
        raise ValueError(f"packed batches need attn_implementation 'sdpa' or 'eager' (a per-token attention mask), "
                         f"the model uses {implementation!r}: load it with attn_implementation='sdpa' or use --packing none")
    keys = torch.arange(visible.shape[1], device=visible.device)
    k, q = keys.view(1, 1, -1), keys.view(1, -1, 1)
    allowed = (k < visible.unsqueeze(-1)) | ((k >= branch_start.unsqueeze(-1)) & (k <= q))  # (rows, L, L)
    allowed = allowed.unsqueeze(1)  # (rows, 1, L, L): one mask for every head
    if implementation == "sdpa":
        return allowed
    return torch.zeros((), dtype=dtype, device=visible.device).masked_fill(~allowed, torch.finfo(dtype).min)


class ProcessRewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: HeadType = "logits", judge_ids: tuple[int, int] | None = None):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
        self.backbone = backbone  # a *ForConditionalGeneration: .model (VL body) and .lm_head
        self.adapter = adapter_for(backbone.config)
        self.head_type = head
        text_config = getattr(backbone.config, "text_config", backbone.config)
        if head == "generative":
            if judge_ids is None:
                raise ValueError("the generative head needs the judgement token ids (see dreamprm.model.judge)")
            vocab = text_config.vocab_size
            if not all(0 <= i < vocab for i in judge_ids):
                raise ValueError(f"judgement token ids {judge_ids} are outside the model's vocabulary ({vocab})")
            self.judge_ids = tuple(int(i) for i in judge_ids)
            self.score_head = None
            return
        self.judge_ids = None
        width = text_config.vocab_size if head == "logits" else text_config.hidden_size
        self.score_head = nn.Linear(width, 1)
        if head == "hidden":
            backbone.lm_head.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, score_index: torch.Tensor,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                mm_token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                packed_visible: torch.Tensor | None = None, packed_branch_start: torch.Tensor | None = None,
                score_row: torch.Tensor | None = None, **_: torch.Tensor) -> torch.Tensor:
        """Score logits, shape [scores]: one per row, or one per ``score_row`` entry when packed."""
        if packed_visible is not None:
            text_config = getattr(self.backbone.config, "text_config", self.backbone.config)
            attention_mask = packed_attention_mask(packed_visible, packed_branch_start,
                                                   text_config._attn_implementation, self.backbone.dtype)
        else:
            position_ids = None
        inputs = self.adapter.body_inputs(dict(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, position_ids=position_ids))
        hidden = self.backbone.model(**inputs, use_cache=False).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device) if score_row is None else score_row
        last = hidden[rows, score_index]  # (scores, hidden)
        if self.head_type == "generative":
            vocab_logits = self.backbone.lm_head(last).float()  # (scores, vocab): the scored positions only
            positive, negative = self.judge_ids
            return vocab_logits[:, positive] - vocab_logits[:, negative]
        if self.head_type == "logits":
            last = self.backbone.lm_head(last)  # (scores, vocab): one position, not the whole sequence
        return self.score_head(last.to(self.score_head.weight.dtype)).squeeze(-1).float()
