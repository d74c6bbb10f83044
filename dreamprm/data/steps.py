"""Splitting a chain of thought into step prefixes (the original DreamPRM's rule).

Prefix i is the text up to the start of step i+1; the last prefix runs up to "Final answer" (or to
the end when there is none). The question text before "Step 1" belongs to every prefix.

>>> split_step_prefixes("Q?\\n\\nStep 1: a\\nStep 2: b\\nFinal answer: 3")
['Q?\\n\\nStep 1: a', 'Q?\\n\\nStep 1: a\\nStep 2: b']
"""
from __future__ import annotations

import re

# "Step 1:", "Step 2.", "**Step 3:**", "step 4 -": a step number followed by a separator.
STEP_MARKER = re.compile(r"(?:\*\*)?\bstep\s*(\d+)\s*(?:\*\*)?\s*[:.\-)]", re.IGNORECASE)
# "Final answer: 3", "**Final answer**: 3", or "Final answer" opening a line. Not "... the final answer
# is 3." inside the last step, which belongs to that step.
FINAL_ANSWER = re.compile(r"(?:\*\*)?\bfinal\s+answer\b(?=\s*(?:\*\*)?\s*[:：])"
                          r"|^[ \t]*(?:\*\*)?final\s+answer\b", re.IGNORECASE | re.MULTILINE)


def step_marker_positions(text: str) -> list[int]:
    """Start offsets of the step markers, in order.

    Step numbers must increase: "Step 3: from Step 1. we get ..." refers back to step 1, it does not
    start a new step.
    """
    starts, last = [], -1
    for m in STEP_MARKER.finditer(text):
        if int(m.group(1)) > last:
            starts.append(m.start())
            last = int(m.group(1))
    return starts


def split_step_prefixes(text: str) -> list[str]:
    """All step prefixes of a chain; empty when the text has no step marker."""
    starts = step_marker_positions(text)
    if not starts:
        return []
    ends = starts[1:]
    final = FINAL_ANSWER.search(text, starts[-1])
    ends.append(final.start() if final else len(text))
    return [text[:end].rstrip() for end in ends]


def final_answer(text: str) -> str | None:
    """The text after the last "Final answer" marker, stripped of separators; None when absent."""
    matches = list(FINAL_ANSWER.finditer(text))
    if not matches:
        return None
    answer = text[matches[-1].end():].strip().lstrip("*:： ").strip()
    return answer.splitlines()[0].strip().strip("*").rstrip(".").strip() if answer else ""
