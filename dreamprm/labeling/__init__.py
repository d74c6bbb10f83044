"""Making DreamPRM's training data from a policy model: `dreamprm-label` (docs/labeling.md).

Questions in, three files out: Monte Carlo step labels (`train.json`), whole chains with their
verdict (`meta.json`) and Best-of-N candidates (`candidates.json`). Modules, one concern each,
imports flowing down the list:

    run.py         the command line: label a shard, merge, import; user errors exit 2
    config.py      typed settings and their flags
    montecarlo.py  one question: sample chains, roll out every step prefix (adaptive budget), verify
    shards.py      --shard i/n by question id; append-only JSONL with per-question completion markers
    merge.py       shard files -> train.json, meta.json, candidates.json (meta balancing)
    visualprm.py   VisualPRM-400K-Raw annotations -> train.json
    progress.py    rollouts/s, tokens/s and the time left
    engines/       one interface (n continuations of prompts), transformers and vLLM behind it
    chains.py      prompts, step splitting, final answers
    verify.py      is an answer right: math-verify, choices, numbers within a tolerance, exact
    questions.py   the questions file, validated like the training files

Nothing here imports DeepSpeed or the trainer.
"""
