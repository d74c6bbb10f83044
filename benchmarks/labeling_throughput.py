#!/usr/bin/env python
"""Labelling throughput per engine: rollouts/s and generated tokens/s, as `dreamprm-label` calls
the engines (`dreamprm.labeling.engines`).

The workload is Monte Carlo labelling's: P step prefixes of one question (same image, same question,
growing chain), each continued `--rollouts` times in one `generate` call per round, seeded per
prompt. One warm-up round is not timed; then `--rounds` rounds are.

    python benchmarks/labeling_throughput.py                                  # CPU: tiny model, transformers
    python benchmarks/labeling_throughput.py --size 2b --engines transformers,vllm --device cuda --dtype bf16

``--size 2b`` builds a randomly initialised Qwen2-VL-2B (the public config's geometry; the tiny
model's tokenizer) once, in ``--model_dir``; nothing is downloaded. With both engines the ratio of
their rollouts/s is printed and checked against the goal of issue 27 (vLLM >= 10x transformers).
Results go to stdout as one JSON object (and to ``--json`` when given).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreamprm.labeling.engines import Prompt, Sampling, build_engine  # noqa: E402

IMAGE = Path(__file__).resolve().parent.parent / "data" / "demo" / "images" / "cand_000.png"
GOAL_RATIO = 10.0


def build_model(size: str, out: Path) -> Path:
    """The tiny model, or a random-init Qwen2-VL-2B geometry with the tiny tokenizer (saved in bf16)."""
    if (out / "config.json").is_file():
        return out
    from dreamprm.model.tiny import build_tiny_qwen2vl
    if size == "tiny":
        return build_tiny_qwen2vl(out)
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from dreamprm.model.tiny import SPECIAL_TOKENS, build_tokenizer
    build_tiny_qwen2vl(out)  # tokenizer, processor and chat template; the weights are replaced below
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(out)
    return out


def prompts(steps: int) -> list[Prompt]:
    chain = [f"Step {i}: I look at part {i} of the image and count the shapes there." for i in range(1, steps + 1)]
    return [Prompt("How many shapes are in the image? Answer step by step.", IMAGE, "\n".join(chain[:i]) + "\n")
            for i in range(1, steps + 1)]


def measure(engine_name: str, model: Path, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    engine = build_engine(engine_name, model, device=args.device, dtype=args.dtype, seed=0,
                          tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len)
    load_s = time.perf_counter() - start
    batch = prompts(args.steps)
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    engine.generate(batch, args.rollouts, sampling, list(range(len(batch))))  # warm-up (compilation, caches)
    rollouts = tokens = 0
    start = time.perf_counter()
    for r in range(args.rounds):
        out = engine.generate(batch, args.rollouts, sampling, [1000 * (r + 1) + i for i in range(len(batch))])
        rollouts += sum(len(x) for x in out)
        tokens += sum(c.tokens for x in out for c in x)
    seconds = time.perf_counter() - start
    engine.close()
    return {"engine": engine_name, "load_s": round(load_s, 2), "seconds": round(seconds, 3), "rollouts": rollouts,
            "tokens": tokens, "rollouts_per_s": round(rollouts / seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="transformers", help="comma-separated: transformers, vllm")
    parser.add_argument("--size", default="tiny", choices=("tiny", "2b"))
    parser.add_argument("--model_dir", default=None, help="where the model is built (default: runs/bench-label-<size>)")
    parser.add_argument("--device", default="cpu", help="transformers engine device")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--tensor_parallel_size", type=int, default=1)
    parser.add_argument("--max_model_len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4, help="step prefixes per round (P)")
    parser.add_argument("--rollouts", type=int, default=8, help="continuations per prefix (M)")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    model = build_model(args.size, Path(args.model_dir or f"runs/bench-label-{args.size}"))
    results = [measure(name, model, args) for name in args.engines.split(",")]
    report = {"size": args.size, "device": args.device, "dtype": args.dtype, "steps": args.steps,
              "rollouts": args.rollouts, "max_new_tokens": args.max_new_tokens, "results": results}
    by = {r["engine"]: r for r in results}
    if {"transformers", "vllm"} <= set(by):
        ratio = by["vllm"]["rollouts_per_s"] / by["transformers"]["rollouts_per_s"]
        report["vllm_over_transformers"] = round(ratio, 2)
        report["goal_10x_met"] = ratio >= GOAL_RATIO
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
