"""GPU benchmark: the original DreamPRM recipe against our trainer, same run, same card.

Builds the Qwen2-VL-2B architecture with random weights (no download) and synthetic samples of
realistic shape (one 448x448 image + ~600 text tokens ≈ 866 tokens), then measures:

1. the original recipe, re-implemented here: batch 1, bf16 parameters, pure-bf16 AdamW, fp32
   `Linear(vocab, 1)` head on the full ``[batch, seq, vocab]`` logits; every 5 lower steps a bi-level
   step: meta backward over the 5 step prefixes (one forward each), then two perturbed forwards with a
   graph to the domain weights (DARTS on bf16 parameters);
2. our trainer (`launch/train.py`, the real code path) at its best single-GPU settings;
3. prefix packing: our trainer on the same chains written as one record per step prefix (as
   DreamPRM's train.json is), with ``--packing none`` and ``--packing chain --chain_batches``.

For each: training samples/s through the whole bi-level loop, lower-step TFLOP/s and MFU
(6·N·tokens over the measured bf16 matmul peak of this card), the upper step's share of a segment,
peak memory. Prints a table last and writes JSON.

    python benchmarks/gpu/bench.py --out results.json              # on a GPU
    python benchmarks/gpu/bench.py --tiny --segments 2             # smoke test on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

QWEN2VL_2B = dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate=8960,
                  vocab=151936, tied=True, vision_depth=32, vision_embed=1280, vision_heads=16)
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate=128, vocab=384, tied=False,
            vision_depth=2, vision_embed=32, vision_heads=2)


def build_model_dir(out: Path, arch: dict, image_side: int) -> Path:
    """Random-init Qwen2-VL of the given size + the tiny model's tokenizer, saved like a checkpoint."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from dreamprm.model.processor import ImageOnlyQwen2VLProcessor, _ImageProcessor
    from dreamprm.model.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = arch["hidden_size"] // arch["num_heads"]
    half = head_dim // 2
    mrope = [16, 24, 24] if half == 64 else [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=max(arch["vocab"], len(tokenizer)), hidden_size=arch["hidden_size"],
                         intermediate_size=arch["intermediate"], num_hidden_layers=arch["num_layers"],
                         num_attention_heads=arch["num_heads"], num_key_value_heads=arch["num_kv_heads"],
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                         max_position_embeddings=32768, tie_word_embeddings=arch["tied"]),
        vision_config=dict(depth=arch["vision_depth"], embed_dim=arch["vision_embed"], num_heads=arch["vision_heads"],
                           hidden_size=arch["hidden_size"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=arch["tied"])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out)
    pixels = image_side * image_side
    processor = ImageOnlyQwen2VLProcessor(image_processor=_ImageProcessor(min_pixels=pixels, max_pixels=pixels),
                                          tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_synthetic_data(out: Path, n_train: int, n_meta: int, image_side: int, words: int, steps: int = 5,
                        prefixes: bool = False) -> None:
    """Records in the original formats: 4 domains, chains of `steps` steps, one image each. With
    `prefixes`, every training chain is written as one record per step prefix (sid 1..steps)."""
    rng = random.Random(0)
    (out / "images").mkdir(parents=True, exist_ok=True)
    vocab = "red green blue circle square count total shape image step so there are more than".split()

    def image(name: str) -> str:
        img = Image.new("RGB", (image_side, image_side), "white")
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.randrange(image_side - 40), rng.randrange(image_side - 40)
            draw.ellipse([x, y, x + 40, y + 40], fill=rng.choice(["red", "green", "blue"]))
        img.save(out / "images" / f"{name}.png")
        return f"images/{name}.png"

    def sentence(n: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(n))

    question = sentence(words // 3)
    train = []
    for i in range(n_train):
        chain = [f"Step {s + 1}: {sentence(2 * words // (3 * steps))}" for s in range(steps)]
        path = image(f"t{i}")
        for sid in range(1 if prefixes else steps, steps + 1):
            train.append({"input": question, "add": "\n".join(chain[:sid]), "image_path": path,
                          "dataset": f"domain_{i % 4}", "accuracy": rng.random(), "id": str(i), "sid": sid})
    meta = [{"input": question + "\n\n" + "\n".join(f"Step {s + 1}: {sentence(2 * words // (3 * steps))}"
                                                    for s in range(steps)) + "\nFinal answer: 3",
             "image_path": image(f"m{i}"), "true_false": bool(i % 2), "id": str(i)} for i in range(n_meta)]
    (out / "train.json").write_text(json.dumps(train))
    (out / "meta.json").write_text(json.dumps(meta))


def bf16_matmul_peak(device: torch.device) -> float:
    """Measured dense bf16 matmul throughput (FLOP/s) of this card: the MFU denominator."""
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 20 / (time.perf_counter() - t0)


def original_recipe(model_dir: Path, data_dir: Path, segments: int, device: torch.device, unroll: int = 5,
                    radius: float = 0.01) -> dict:
    """The original's loop, re-implemented: batch 1, bf16 params, full-vocab logits, Betty-style DARTS."""
    from dreamprm.model.prm import model_inputs
    from dreamprm.data.datasets import MetaDataset, PRMCollator, TrainDataset
    from dreamprm.data.records import domain_index, load_meta_records, load_train_records
    from dreamprm.model.loading import load_backbone
    from dreamprm.model.processor import load_processor

    backbone = load_backbone(model_dir, dtype=torch.bfloat16).to(device)
    head = torch.nn.Linear(backbone.config.text_config.vocab_size, 1).to(device)  # fp32, as the original
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=5e-7, weight_decay=1e-3)
    records = load_train_records(data_dir / "train.json")
    domains = domain_index(records)
    a = torch.zeros(len(domains), device=device, requires_grad=True)
    meta_optimizer = torch.optim.AdamW([a], lr=0.01)
    collate = PRMCollator(load_processor(model_dir))
    train_set, meta_set = TrainDataset(records, domains), MetaDataset(load_meta_records(data_dir / "meta.json"))

    def score(batch: dict) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items() if k != "score_index"}
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        logits = backbone(**inputs).logits  # [batch, seq, vocab], as the original materialises it
        return torch.sigmoid(head(logits[:, -1].float()).squeeze(-1))

    def weights() -> torch.Tensor:
        s = torch.nn.functional.softplus(a)
        return s / s.mean()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    lower_times, upper_times, segment_times, tokens = [], [], [], []
    index = 0
    for segment in range(segments + 1):  # the first segment warms up
        sync()
        t_segment = time.perf_counter()
        for _ in range(unroll):
            batch = collate([train_set[index % len(train_set)]])
            index += 1
            t0 = time.perf_counter()
            loss = ((score(batch) - batch["target"].to(device)) ** 2 * weights().detach()[batch["domain"].to(device)]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync()
            lower_times.append(time.perf_counter() - t0)
            tokens.append(int(batch["attention_mask"].sum()))
        t0 = time.perf_counter()
        # Meta loss: one forward per step prefix (the original scores prefixes one at a time).
        meta_item = meta_set[segment % len(meta_set)]
        prefix_scores = [score(collate([{**meta_item, "texts": [text]}])) for text in meta_item["texts"]]
        chain = torch.sigmoid(torch.logit(torch.cat(prefix_scores).clamp(1e-6, 1 - 1e-6)).mean())
        meta_loss = (chain - meta_item["target"]) ** 2
        v = torch.autograd.grad(meta_loss, params, allow_unused=True)
        v = [torch.zeros_like(q) if g is None else g for q, g in zip(params, v)]
        eps = radius / torch.sqrt(sum((g.float() ** 2).sum() for g in v))
        grads = []
        with torch.no_grad():
            saved = [q.detach().clone() for q in params]
        for sign in (1.0, -1.0):  # θ ± εv in the parameters' own dtype (bf16): rounding-prone
            with torch.no_grad():
                for q, s, g in zip(params, saved, v):
                    q.copy_((s.float() + sign * eps * g.float()).to(q.dtype))
            train_loss = ((score(batch) - batch["target"].to(device)) ** 2 * weights()[batch["domain"].to(device)]).mean()
            grads.append(torch.autograd.grad(train_loss, a)[0])
        with torch.no_grad():
            for q, s in zip(params, saved):
                q.copy_(s)
        meta_optimizer.zero_grad()
        a.grad = -(grads[0] - grads[1]) / (2 * eps)
        meta_optimizer.step()
        sync()
        upper_times.append(time.perf_counter() - t0)
        segment_times.append(time.perf_counter() - t_segment)
        if segment == 0:
            lower_times, upper_times, segment_times, tokens = [], [], [], []
    n_params = sum(q.numel() for q in params)
    return {"samples_per_s": unroll / statistics.median(segment_times),
            "segment_s": statistics.median(segment_times), "lower_step_s": statistics.median(lower_times),
            "upper_share": statistics.median(upper_times) / statistics.median(segment_times),
            "lower_flops_per_s": 6 * n_params * statistics.mean(tokens) / statistics.median(lower_times),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
            "batch_size": 1}


def our_trainer(model_dir: Path, data_dir: Path, out: Path, segments: int, batch_size: int, extra: list[str]) -> dict:
    """launch/train.py on the synthetic data; numbers read back from its TensorBoard scalars."""
    from dreamprm.metrics import read_scalars
    steps = 5 * (segments + 2)
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--reward_model", str(model_dir),
           "--train_json_file", str(data_dir / "train.json"), "--meta_json_file", str(data_dir / "meta.json"),
           "--weights_path", str(out), "--batch_size", str(batch_size), "--meta_batch_size", "1",
           "--meta_loss", "mse", "--iteration_num", str(steps), "--unroll_steps", "5", "--log_every", "5", "--no-export",
           "--save_every_iterations", str(10 * steps), *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               HWLOC_COMPONENTS="-gl")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"trainer failed:\n{proc.stderr[-4000:]}")
    series = {tag: [v for _, v in points][1:] or [v for _, v in points]
              for tag, points in read_scalars(out / "tb").items()}  # drop the warm-up window
    samples_s = statistics.median(series["perf/samples_per_s"])
    segment_s = 5 * batch_size / samples_s
    upper_s = statistics.median(series["perf/upper_step_s"])
    tokens_s = statistics.median(series["perf/tokens_per_s"])
    return {"samples_per_s": samples_s, "segment_s": segment_s, "upper_share": upper_s / segment_s,
            "tokens_per_s_through_loop": tokens_s, "lower_step_s": (segment_s - upper_s) / 5,
            "peak_memory_gib": max(series.get("perf/peak_memory_gib", [float("nan")])), "batch_size": batch_size}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny architecture and images (CPU smoke test)")
    p.add_argument("--segments", type=int, default=4, help="timed 5-step segments per arm (after a warm-up)")
    p.add_argument("--batch_size", type=int, default=8, help="our trainer's micro-batch")
    p.add_argument("--ours", default="--head hidden --deepspeed ds_configs/zero2.json --precision bf16 --hypergrad exact",
                   help="our trainer's extra flags")
    p.add_argument("--skip_original", action="store_true")
    p.add_argument("--skip_packing", action="store_true", help="skip the per-prefix / packed arms")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch, side, words = (TINY, 56, 60) if args.tiny else (QWEN2VL_2B, 448, 600)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dreamprm-bench-"))
    model_dir = build_model_dir(work / "model", arch, side)
    make_synthetic_data(work / "data", n_train=64, n_meta=8, image_side=side, words=words)
    peak = bf16_matmul_peak(device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "bf16_peak_flops": peak}
    extra = args.ours.split() + (["--precision", "fp32", "--device", "cpu"] if device.type == "cpu" else [])
    results["ours"] = our_trainer(model_dir, work / "data", work / "ours", args.segments, args.batch_size, extra)
    if not args.skip_packing:
        # One record per step prefix: 64 chains x 5 prefixes; the same records for both arms.
        make_synthetic_data(work / "prefix_data", n_train=64, n_meta=8, image_side=side, words=words, prefixes=True)
        for arm, flags in (("ours_per_prefix", ["--packing", "none"]),
                           ("ours_packed", ["--packing", "chain", "--chain_batches"])):
            results[arm] = our_trainer(model_dir, work / "prefix_data", work / arm, args.segments, args.batch_size,
                                       extra + flags)
    if not args.skip_original:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        results["original"] = original_recipe(model_dir, work / "data", args.segments, device)
    from safetensors.torch import load_file
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model_dir)
    n_params = sum(t.numel() for f in model_dir.glob("*.safetensors") for t in load_file(str(f)).values())
    for arm in ("ours", "ours_per_prefix", "ours_packed"):
        if arm in results:
            ours = results[arm]
            tokens_per_segment = ours["tokens_per_s_through_loop"] * ours["segment_s"]
            ours["lower_flops_per_s"] = 6 * n_params * tokens_per_segment / (5 * ours["lower_step_s"])
    arms = ("original", "ours", "ours_per_prefix", "ours_packed")
    for arm in arms:
        if arm in results:
            results[arm]["mfu"] = results[arm]["lower_flops_per_s"] / peak if peak == peak else float("nan")
    results["params"] = n_params
    results["config"] = {"text_hidden": cfg.text_config.hidden_size, "layers": cfg.text_config.num_hidden_layers}
    if "original" in results:
        results["speedup"] = ours["samples_per_s"] / results["original"]["samples_per_s"]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"device: {results['device']}, params {n_params / 1e9:.3f} B, bf16 peak {peak / 1e12:.0f} TFLOP/s")
    print(f"{'arm':<16}{'batch':>6}{'samples/s':>11}{'lower TFLOP/s':>15}{'MFU':>7}{'upper share':>13}{'peak GiB':>10}")
    for arm in arms:
        if arm in results:
            r = results[arm]
            print(f"{arm:<16}{r['batch_size']:>6}{r['samples_per_s']:>11.2f}{r['lower_flops_per_s'] / 1e12:>15.2f}"
                  f"{r['mfu']:>7.1%}{r['upper_share']:>13.1%}{r['peak_memory_gib']:>10.1f}")
    if "ours_packed" in results:
        results["packing_speedup"] = results["ours_packed"]["samples_per_s"] / results["ours_per_prefix"]["samples_per_s"]
    if "speedup" in results:
        print(f"speed-up through the whole bi-level loop: {results['speedup']:.2f}x")
    if "packing_speedup" in results:
        # lower TFLOP/s counts processed tokens: packed rows hold fewer tokens for the same samples
        print(f"prefix packing (same per-prefix records): {results['packing_speedup']:.2f}x samples/s")
    return results


if __name__ == "__main__":
    main()
