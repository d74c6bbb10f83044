"""How a step prefix becomes a chat text, in the backbone's own chat template.

Two layouts, chosen by the head:
- scalar heads (``logits``, ``hidden``): the image and the whole prefix in one user turn, then the
  generation prompt; the score is read at the prompt's last token (the original's layout).
- ``generative``: a conversation, one step per turn as VisualPRM and DreamPRM-1.5 lay it out:
  the image, the question and step 1 in the first user turn, every later step a user turn of its
  own, and after each step an assistant turn holding the judgement. The score of the last step is
  read at the generation prompt after it, where the model's next token is the judgement.

Earlier steps' judgements are always the positive token: the layout is the same in training, in
the meta objective and in Best-of-N, so the text of prefix j is a prefix of the text of prefix j+1
and the packed row of a chain is the chain's conversation itself, one sequence, with a judgement
read after every step (`dreamprm.data.packing` finds this by itself: every prefix lies on the spine).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dreamprm.data.steps import step_marker_positions
from dreamprm.model.judge import JUDGE_DEFAULT, parse_judge_tokens


def step_turns(text: str) -> list[str]:
    """A prefix cut into its turns: the question with step 1, then each later step.

    >>> step_turns("Q?\\n\\nStep 1: a\\nStep 2: b")
    ['Q?\\n\\nStep 1: a', 'Step 2: b']
    >>> step_turns("no steps here")
    ['no steps here']
    """
    starts = step_marker_positions(text)[1:]
    bounds = [0, *starts, len(text)]
    return [t for t in (text[a:b].strip() for a, b in zip(bounds, bounds[1:])) if t] or [text]


@dataclass(frozen=True)
class ChainLayout:
    """The chat layout of a head: ``generative`` one step per turn, judged with ``judge_positive``
    in earlier assistant turns; otherwise one user turn."""

    generative: bool = False
    judge_positive: str = "+"

    def messages(self, text: str) -> list[dict[str, Any]]:
        if not self.generative:
            return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        turns = step_turns(text)
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0]}]}]
        for turn in turns[1:]:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": self.judge_positive}]})
            messages.append({"role": "user", "content": [{"type": "text", "text": turn}]})
        return messages

    def chat_text(self, tokenizer: Any, text: str) -> str:
        """The chat text of one step prefix, ending with the generation prompt (the scored token)."""
        return tokenizer.apply_chat_template(self.messages(text), tokenize=False, add_generation_prompt=True)


def chain_layout(head: str, judge_tokens: str = JUDGE_DEFAULT) -> ChainLayout:
    """The layout of a head (see the module docstring)."""
    return ChainLayout(generative=head == "generative", judge_positive=parse_judge_tokens(judge_tokens)[0])
