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
FINAL_ANSWER = re.compile(r"(?:\*\*)?\bfinal\s+answer\b", re.IGNORECASE)


def step_marker_positions(text: str) -> list[int]:
    """Start offsets of the step markers, in order."""
    return [m.start() for m in STEP_MARKER.finditer(text)]


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
    return answer.splitlines()[0].strip().rstrip(".").strip() if answer else ""
