"""Labelling one question: sample chains from the policy, roll out every step prefix, verify.

Per split (`questions.SPLITS`):
    train  K chains; for step prefix i of each, M rollouts continue to a final answer. The record
           of the prefix gets ``score`` = rollouts right, ``times`` = rollouts made and
           ``accuracy`` = score / times (the original's train schema). With the adaptive budget
           (max_rollouts > rollouts, the original's rule) a prefix whose accuracy is strictly
           between 0 and 1 gets `rollouts` more, until it is 0 or 1 or `max_rollouts` is reached.
    meta   K chains, each a meta record with ``true_false`` from the verifier.
    test   N chains, one candidates entry (`dreamprm.bestofn`'s format) with ``correct`` per chain.

Every engine call is seeded from (seed, question id, chain, step, round) alone, so a question's
records do not depend on the shard it falls in, on the questions before it or on a resume.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from dreamprm.labeling.chains import Chain, parse_answer, policy_prompt, question_prompt, render_steps, split_chain
from dreamprm.labeling.engines import Engine, Prompt, Sampling
from dreamprm.labeling.questions import Question
from dreamprm.labeling.verify import Verifier


@dataclass(frozen=True)
class LabelSettings:
    chains: int  # K: chains per training question
    meta_chains: int  # chains per meta question
    candidates: int  # N: chains per test question
    rollouts: int  # M: first rollouts per step prefix (and the size of each adaptive round)
    max_rollouts: int  # the adaptive budget's cap; == rollouts: a fixed budget
    split_rule: str
    instruction: str
    prefill: str  # the assistant turn starts with it ("Step 1:"), so every chain has the format
    chain_sampling: Sampling
    rollout_sampling: Sampling
    seed: int


@dataclass
class Work:
    """What a question cost: the progress bar's rates and the benchmark's."""
    rollouts: int = 0  # sampled continuations: chains and rollouts
    tokens: int = 0
    records: list[tuple[str, dict]] = field(default_factory=list)  # (kind, record), kind: train/meta/candidates


def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed from the run's seed and a path of names; stable across processes and Python
    versions (no `hash()`, which PYTHONHASHSEED salts)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sample_chains(engine: Engine, q: Question, k: int, s: LabelSettings, work: Work, tag: str) -> list[Chain]:
    prompt = Prompt(policy_prompt(question_prompt(q.question, q.choices), s.instruction), q.image_path, s.prefill)
    [completions] = engine.generate([prompt], k, s.chain_sampling, [derive_seed(s.seed, q.qid, tag)])
    work.rollouts += len(completions)
    work.tokens += sum(c.tokens for c in completions)
    return [split_chain(s.prefill + c.text, s.split_rule) for c in completions]


def rollout_counts(engine: Engine, q: Question, chain: Chain, c: int, s: LabelSettings, verifier: Verifier,
                   work: Work) -> list[tuple[int, int]]:
    """(right, total) rollouts for each step prefix of `chain`, with the adaptive budget."""
    user = policy_prompt(question_prompt(q.question, q.choices), s.instruction)
    # The rollout continues the prefix on a new line: the next "Step n:" or the final answer.
    prompts = [Prompt(user, q.image_path, render_steps(chain.steps, i) + "\n") for i in range(1, len(chain.steps) + 1)]
    counts = [[0, 0] for _ in prompts]
    pending = list(range(len(prompts)))
    round_ = 0
    while pending:
        n = min(s.rollouts, s.max_rollouts - counts[pending[0]][1])
        results = engine.generate([prompts[i] for i in pending], n, s.rollout_sampling,
                                  [derive_seed(s.seed, q.qid, "train", c, i + 1, round_) for i in pending])
        for i, completions in zip(pending, results):
            counts[i][0] += sum(verifier(parse_answer(x.text), q.ground_truth, q.choices) for x in completions)
            counts[i][1] += len(completions)
            work.rollouts += len(completions)
            work.tokens += sum(x.tokens for x in completions)
        round_ += 1
        pending = [i for i in pending if 0 < counts[i][0] < counts[i][1] and counts[i][1] < s.max_rollouts]
    return [(right, total) for right, total in counts]


def label_question(engine: Engine, q: Question, s: LabelSettings, verifier: Verifier) -> Work:
    """Every record of one question, in a fixed order."""
    work = Work()
    text = question_prompt(q.question, q.choices)
    common = {"image_path": str(q.image_path), "dataset": q.dataset, "ground_truth": q.ground_truth}
    if q.split == "train":
        for c, chain in enumerate(sample_chains(engine, q, s.chains, s, work, "train")):
            for sid, (right, total) in enumerate(rollout_counts(engine, q, chain, c, s, verifier, work), start=1):
                work.records.append(("train", {"id": f"{q.qid}-{c}", "sid": sid, "input": text,
                                               "add": render_steps(chain.steps, sid), **common,
                                               "score": right, "times": total, "accuracy": right / total}))
    elif q.split == "meta":
        for c, chain in enumerate(sample_chains(engine, q, s.meta_chains, s, work, "meta")):
            work.records.append(("meta", {"id": f"{q.qid}-{c}", "input": f"{text}\n\n{chain.text()}", **common,
                                          "answer": chain.answer,
                                          "true_false": verifier(chain.answer, q.ground_truth, q.choices)}))
    else:
        chains = sample_chains(engine, q, s.candidates, s, work, "test")
        work.records.append(("candidates", {"id": q.qid, "question": text, **common, "candidates": [
            {"text": chain.text(), "answer": chain.answer, "correct": verifier(chain.answer, q.ground_truth, q.choices)}
            for chain in chains]}))
    return work
