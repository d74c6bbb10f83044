"""The judgement tokens of a generative PRM: parsed from ``--judge_tokens`` and resolved to token ids
of the backbone's tokenizer, with an error that says why a tokenizer cannot judge."""
from __future__ import annotations

from typing import Any

JUDGE_DEFAULT = "+,-"


class JudgeTokenError(ValueError):
    """The judgement tokens are not single tokens of the tokenizer (or not two distinct ones)."""


def parse_judge_tokens(spec: str) -> tuple[str, str]:
    """``"+,-"`` -> ("+", "-"): the positive and the negative judgement."""
    parts = spec.split(",")
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise JudgeTokenError(f"--judge_tokens {spec!r}: expected two different tokens separated by a comma, "
                              "positive first (e.g. '+,-')")
    return parts[0], parts[1]


def resolve_judge_tokens(tokenizer: Any, spec: str, source: str = "the tokenizer") -> tuple[int, int]:
    """Token ids of the positive and negative judgements; each must encode to exactly one token,
    as it does after the generation prompt (where the model predicts it)."""
    ids = []
    for token in parse_judge_tokens(spec):
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise JudgeTokenError(f"--judge_tokens {spec!r}: {token!r} is {len(encoded)} tokens in {source} "
                                  f"({encoded}); a generative PRM reads one token's probability: choose judgements "
                                  "that are single tokens of this tokenizer")
        ids.append(int(encoded[0]))
    return ids[0], ids[1]
