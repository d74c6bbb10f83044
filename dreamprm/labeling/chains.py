"""Prompts, step splitting and final answers: text in, text out, no model.

A sampled chain is cut into step bodies by a rule (``step``: the "Step n:" markers that
`dreamprm.data.steps` uses for training, or ``blank``: paragraphs), and written back in one
canonical form, ``"Step 1: ...\\nStep 2: ...\\nFinal answer: X"``, whatever the rule: the training
files, meta records and candidates all cut chains at "Step n:" markers.

>>> chain = split_chain("Step 1: 2 + 1 = 3.\\nStep 2: So 3.\\nFinal answer: 3", "step")
>>> chain.steps, chain.answer
(('2 + 1 = 3.', 'So 3.'), '3')
>>> render_steps(chain.steps, 1)
'Step 1: 2 + 1 = 3.'
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from dreamprm.data.steps import FINAL_ANSWER, STEP_MARKER, final_answer, step_marker_positions

SPLIT_RULES = ("step", "blank")

DEFAULT_INSTRUCTION = ("Solve the problem step by step. Start each step on a new line with 'Step n:' "
                       "(Step 1:, Step 2:, ...) and end with a line 'Final answer: <answer>'.")

_BOXED = re.compile(r"\\boxed\s*\{")
_PARAGRAPHS = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class Chain:
    steps: tuple[str, ...]  # step bodies, markers removed
    answer: str | None  # the parsed final answer; None when the chain gives none

    def text(self) -> str:
        """The canonical chain: numbered steps, then the final answer line when there is one."""
        body = render_steps(self.steps, len(self.steps))
        return body if self.answer is None else f"{body}\nFinal answer: {self.answer}"


def question_prompt(question: str, choices: tuple[str, ...]) -> str:
    """The question as the PRM will read it (`input` of the training records): options lettered A, B, ..."""
    if not choices:
        return question
    options = "\n".join(f"{chr(ord('A') + j)}. {c}" for j, c in enumerate(choices))
    return f"{question}\nOptions:\n{options}"


def policy_prompt(question: str, instruction: str) -> str:
    """The user turn the policy answers: the question (with options), then the format instruction."""
    return f"{question}\n\n{instruction}" if instruction else question


def render_steps(steps: tuple[str, ...] | list[str], upto: int) -> str:
    """The first `upto` steps, numbered from 1, one per line."""
    return "\n".join(f"Step {i}: {body}".rstrip() for i, body in enumerate(steps[:upto], start=1))


def parse_answer(text: str) -> str | None:
    """The text after the last "Final answer:", else the contents of the last ``\\boxed{...}``, else None."""
    answer = final_answer(text)
    if answer:
        return answer
    starts = [m.end() for m in _BOXED.finditer(text)]
    if starts:
        depth, start = 1, starts[-1]
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip() or None
    return answer or None


def split_chain(text: str, rule: str) -> Chain:
    """Step bodies and final answer of a sampled chain. A chain in which the rule finds no step is
    one step (its whole text before the final answer), so every chain has at least one prefix."""
    final = FINAL_ANSWER.search(text)
    body = text[:final.start()] if final else text
    if rule == "step":
        starts = step_marker_positions(body)
        bodies = [STEP_MARKER.sub("", body[s:e], count=1).strip()
                  for s, e in zip(starts, starts[1:] + [len(body)])]
        if starts and body[:starts[0]].strip():
            # Text before "Step 1" (a preamble the model wrote) stays with the first step.
            bodies[0] = f"{body[:starts[0]].strip()} {bodies[0]}".strip()
    elif rule == "blank":
        bodies = [p.strip() for p in _PARAGRAPHS.split(body) if p.strip()]
    else:
        raise ValueError(f"unknown split rule {rule!r} (one of {', '.join(SPLIT_RULES)})")
    bodies = bodies or [body.strip()]
    return Chain(steps=tuple(bodies), answer=parse_answer(text))
