"""The progress bar of a labelling shard: questions done, rollouts/s, tokens/s and the time left.

tqdm estimates the time left from the questions' rate; rollouts/s and tokens/s are over the whole
run so far (questions differ a lot in cost: one rate per question would jump).
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, done: int, label: str, enabled: bool = True):
        self.bar = tqdm(total=total, initial=done, desc=label, unit="q", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, mininterval=1.0)
        self.start = time.perf_counter()
        self.rollouts = 0
        self.tokens = 0

    def update(self, rollouts: int, tokens: int) -> None:
        self.rollouts += rollouts
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.rollouts / elapsed:.1f} rollouts/s, {self.tokens / elapsed:.0f} tok/s",
                                 refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
