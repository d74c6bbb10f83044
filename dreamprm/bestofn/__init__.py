"""Best-of-N selection and evaluation with an exported PRM.

The PRM scores every step prefix of each of the N candidate chains of a question. The step scores
of a chain are combined into one chain score by the aggregation that training uses
(`dreamprm.bilevel.aggregation`). The chain with the highest score is selected.

    python -m dreamprm.bestofn --prm runs/<run>/export --candidates data/demo/candidates.json
    # several processes, each scoring a contiguous slice of the questions:
    torchrun --nproc_per_node 4 launch/bestofn.py --prm runs/<run>/export --candidates FILE

The model sees a prefix exactly as training sees a meta record: the image and
``question + "\\n\\n" + chain`` in one user turn, cut at the step markers by `split_step_prefixes`.
When the candidates carry ``correct`` labels or a ``ground_truth``, a report compares PRM
selection with majority vote, a random pick and the oracle for N = 1, 2, 4, ..., N.

One module a concern, in the order a run uses them:

- `config`: the flags (`BestOfNConfig`, `parse_args`);
- `candidates`: the candidates file, its schema and validation; answer normalisation;
- `scorer`: the exported PRM's folder checks, the step-logit scorer and its scoring loop (`score_chains`, which
  `dreamprm.evaluation` drives with the live training engine);
- `selection`: chain scores, the best chain, majority vote;
- `evaluation`: accuracies for N = 1, 2, 4, ..., N and the printed report;
- `run`: validate, score a rank's slice, gather, select, evaluate, write.

This package imports no training code: no trainer, no DeepSpeed, no ``torch.distributed``. The
multi-process entry point (`launch/bestofn.py`) passes its collectives in as functions.
"""
