#!/usr/bin/env python
"""Prefix packing, measured: per-prefix against packed on the same data, in one run.

1. Tokens the model processes (the collators' real rows; padding not counted) for meta chains,
   training records batched as the trainer batches them, and Best-of-N candidates.
2. Wall time through the real code paths on CPU, tiny model: `launch/train.py` with ``--packing
   none`` and ``--packing chain --chain_batches`` (lower step, upper step, segment, from its
   TensorBoard scalars) and the Best-of-N scorer of `dreamprm.bestofn`.
3. Forward FLOPs at the Qwen2-VL-2B geometry for the same token layouts (vision tower included: the
   per-prefix path encodes the image once per prefix).

Data: the bundled demo (2-4 steps, 56x56 images) and a task with 5-8 steps per chain and 448x448
images (built here from the demo generator's scenes and sentences), read by a tiny model whose
processor keeps 448x448 (256 image tokens, as Qwen2-VL-2B sees that image).

    python benchmarks/packing.py                       # ~10 min on 2 CPU cores
    python benchmarks/packing.py --skip_timing         # tokens and FLOPs only (~1.5 min)

Last results: benchmarks/PACKING_RESULTS.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from dreamprm.data.datasets import MetaDataset, PRMCollator, TrainDataset  # noqa: E402
from dreamprm.data.packing import PackedPRMCollator, chain_units, group_chain_records  # noqa: E402
from dreamprm.data.records import domain_index, load_meta_records, load_train_records  # noqa: E402
from dreamprm.data.sampler import DistributedBatchSampler  # noqa: E402

QWEN2VL_2B = dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936,
                  vision_depth=32, vision_embed=1280, vision_mlp=5120, merge=2)


def _demo_module():
    spec = importlib.util.spec_from_file_location("make_demo", REPO / "data" / "demo" / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_long_task(out: Path, seed: int = 0, chains_per_domain: int = 12, meta: int = 32, questions: int = 16,
                   candidates: int = 4, side: int = 448) -> Path:
    """Chains of 5-8 steps on side x side images: count 4-7 (colour, shape) categories, then add up.

    Scenes, sentences, errors and Monte Carlo labels come from the demo generator; the question
    names the categories counted, so every chain is self-consistent.
    """
    demo = _demo_module()
    (out / "images").mkdir(parents=True, exist_ok=True)
    categories = [(c, k) for c in demo.COLOR_NAMES for k in demo.KINDS]

    def item(rng: random.Random, name: str) -> dict:
        scene = demo.make_scene(rng)
        obs = rng.sample(categories, rng.randint(4, 6))
        obs += [obs[0]] * (rng.random() < 0.25)  # a recount: up to 8 steps
        plan = {"obs": obs, "combine": ("sum", (None, None))}
        question = "Count these in order and add up: " + ", ".join(demo.noun(c, k, 2) for c, k in obs) + "."
        gt = str(sum(len(demo.matching_cells(scene, color=c, kind=k)) for c, k in obs))
        demo.draw_scene(scene, rng).resize((side, side)).save(out / "images" / f"{name}.png")
        return {"scene": scene, "plan": plan, "question": question, "gt": gt, "image_path": f"images/{name}.png"}

    def chain(rng: random.Random, it: dict, correct: bool) -> tuple[list[str], str, int | None]:
        steps, answer, err = demo.make_chain(it["scene"], it["plan"], rng, error=not correct)
        return steps, answer, err

    train = []
    for domain in ("clean", "noisy", "inverted", "other"):
        rng = random.Random(f"{seed}/long/train/{domain}")
        for i in range(chains_per_domain):
            it = item(rng, f"train_{domain}_{i:03d}")
            steps, _, err = chain(rng, it, rng.random() < 0.5)
            for sid in range(1, len(steps) + 1):
                train.append({"id": f"{domain}-{i:03d}", "sid": sid, "input": it["question"], "dataset": domain,
                              "add": "\n".join(f"Step {k + 1}: {s}" for k, s in enumerate(steps[:sid])),
                              "image_path": it["image_path"], "ground_truth": it["gt"],
                              "accuracy": demo.mc_accuracy(len(steps), sid, err, rng)})
    rng = random.Random(f"{seed}/long/meta")
    meta_records = []
    for i in range(meta):
        it = item(rng, f"meta_{i:03d}")
        steps, answer, _ = chain(rng, it, i % 2 == 0)
        meta_records.append({"id": f"meta-{i:03d}", "input": it["question"] + "\n\n" + demo.chain_text(steps, answer),
                             "image_path": it["image_path"], "true_false": i % 2 == 0})
    rng = random.Random(f"{seed}/long/candidates")
    cands = []
    for i in range(questions):
        it = item(rng, f"cand_{i:03d}")
        chains = [chain(rng, it, j % 2 == 0) for j in range(candidates)]
        cands.append({"id": f"cand-{i:03d}", "image_path": it["image_path"], "question": it["question"],
                      "ground_truth": it["gt"], "candidates": [{"text": demo.chain_text(s, a), "correct": a == it["gt"]}
                                                               for s, a, _ in chains]})
    for name, records in (("train.json", train), ("meta.json", meta_records), ("candidates.json", cands)):
        (out / name).write_text(json.dumps(records, indent=1))
    return out


def tiny_model_at(out: Path, side: int) -> Path:
    """The tiny Qwen2-VL whose image processor keeps side x side images (no downscaling)."""
    from dreamprm.model.processor import _ImageProcessor, load_processor
    from dreamprm.model.tiny import build_tiny_qwen2vl
    build_tiny_qwen2vl(out)
    processor = load_processor(out)
    processor.image_processor = _ImageProcessor(min_pixels=28 * 28, max_pixels=side * side)
    processor.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------ tokens
def row_lengths(batch: dict) -> list[int]:
    return batch["attention_mask"].sum(dim=1).tolist()


def meta_layouts(path: Path, processor, chains_per_batch: int = 8) -> dict:
    """Rows of every meta chain, per-prefix and packed (lengths of real tokens, image tokens)."""
    dataset = MetaDataset(load_meta_records(path))
    out = {"none": [], "chain": [], "prefixes": []}
    for start in range(0, len(dataset), chains_per_batch):
        items = [dataset[i] for i in range(start, min(start + chains_per_batch, len(dataset)))]
        out["none"] += row_lengths(PRMCollator(processor)(items))
        out["chain"] += row_lengths(PackedPRMCollator(processor)(items))
        out["prefixes"] += [len(it["texts"]) for it in items]
    return out


def train_layouts(path: Path, processor, batch_size: int, chain_batches: bool) -> dict:
    """One epoch of training batches of `batch_size` records as the trainer's sampler draws them:
    independent records (the default), or each chain's records together (``--chain_batches``; a
    chain may be split by a batch end). The records of a chain in one batch share a packed row."""
    records = load_train_records(path)
    groups = group_chain_records(records)
    dataset = TrainDataset(records, domain_index(records), groups=groups)
    sampler = DistributedBatchSampler([len(r.text) for r in records], batch_size, seed=0,
                                      units=chain_units(groups) if chain_batches else None)
    out = {"none": [], "chain": []}
    for batch in sampler:
        items = [dataset[i] for i in batch]
        out["none"] += row_lengths(PRMCollator(processor)(items))
        out["chain"] += row_lengths(PackedPRMCollator(processor)(items))
    return out


def candidate_layouts(path: Path, processor) -> dict:
    from dreamprm.data.records import load_image
    from dreamprm.data.steps import split_step_prefixes
    out = {"none": [], "chain": []}
    for q in json.loads(path.read_text()):
        image = load_image(path.parent / q["image_path"])
        items = [{"image": image, "texts": split_step_prefixes(q["question"] + "\n\n" + c["text"]), "domain": -1,
                  "target": 0.0} for c in q["candidates"]]
        out["none"] += row_lengths(PRMCollator(processor)(items))
        out["chain"] += row_lengths(PackedPRMCollator(processor)(items))
    return out


# ------------------------------------------------------------------------------------------- FLOPs
def forward_flops(rows: list[int], images: int, image_tokens: int, packed: bool, g: dict = QWEN2VL_2B) -> float:
    """Forward FLOPs of rows of the given real lengths at geometry `g` (multiply-add = 2 FLOPs).

    Language model: linear layers 2 * tokens * weights; attention 4 * hidden * (query, key) pairs,
    causal (L^2 / 2) per-prefix, the full L^2 when packed (an arbitrary mask gets no block skipping
    from SDPA's kernels). Vision tower: `images` encodings of image_tokens * merge^2 patches.
    """
    h, kv = g["hidden"], g["hidden"] // g["heads"] * g["kv_heads"]
    per_token = 2 * g["layers"] * (2 * h * h + 2 * h * kv + 3 * h * g["intermediate"])
    pairs = sum(n * n if packed else n * (n + 1) / 2 for n in rows)
    lm = per_token * sum(rows) + 4 * h * g["layers"] * pairs
    patches, e = image_tokens * g["merge"] ** 2, g["vision_embed"]
    vision = g["vision_depth"] * (2 * patches * (4 * e * e + 2 * e * g["vision_mlp"]) + 4 * e * patches * patches)
    return lm + images * vision


def token_table(name: str, layouts: dict, image_tokens: int) -> dict:
    none, chain = layouts["none"], layouts["chain"]
    entry = {"rows_none": len(none), "rows_chain": len(chain), "tokens_none": sum(none), "tokens_chain": sum(chain),
             "token_ratio": sum(none) / sum(chain),
             "flops_ratio_2b": forward_flops(none, len(none), image_tokens, False)
             / forward_flops(chain, len(chain), image_tokens, True)}
    print(f"{name:<40}{entry['rows_none']:>7}{entry['rows_chain']:>7}{entry['tokens_none']:>9}"
          f"{entry['tokens_chain']:>9}{entry['token_ratio']:>7.2f}x{entry['flops_ratio_2b']:>8.2f}x", flush=True)
    return entry


# -------------------------------------------------------------------------------------------- time
def time_training(model: Path, data: Path, out: Path, packing: str, segments: int, batch_size: int) -> dict:
    """launch/train.py on CPU (1 rank, fp32, hidden head, exact hypergradient), timed from its
    TensorBoard scalars, first window dropped: a bi-level run gives the segment (5 lower steps + 1
    upper step) and the upper step; a --baseline run (no upper level) gives the lower step."""
    from dreamprm.metrics import read_scalars
    steps = 5 * (segments + 2)
    common = ["--reward_model", str(model), "--train_json_file", str(data / "train.json"), "--meta_json_file",
              str(data / "meta.json"), "--batch_size", str(batch_size), "--meta_batch_size", "2", "--iteration_num",
              str(steps), "--unroll_steps", "5", "--log_every", "5", "--no-export", "--save_every_iterations",
              str(10 * steps), "--packing", packing, "--precision", "fp32", "--device", "cpu", "--head", "hidden",
              "--hypergrad", "exact"] + (["--chain_batches"] if packing == "chain" else [])
    series = {}
    for arm, extra in (("bilevel", []), ("baseline", ["--baseline"])):
        folder = out / arm
        subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *common, "--weights_path", str(folder),
                        *extra], check=True, capture_output=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO), "HWLOC_COMPONENTS": "-gl", "OMP_NUM_THREADS": "1"})
        series[arm] = {tag: [v for _, v in points][1:] for tag, points in read_scalars(folder / "tb").items()}
    median = statistics.median
    lower_samples = median(series["baseline"]["perf/samples_per_s"])
    return {"lower_step_s": batch_size / lower_samples,
            "lower_step_tokens": batch_size * median(series["baseline"]["perf/tokens_per_s"]) / lower_samples,
            "upper_step_s": median(series["bilevel"]["perf/upper_step_s"]),
            "segment_s": 5 * batch_size / median(series["bilevel"]["perf/samples_per_s"])}


def time_best_of_n(model: Path, candidates: Path, packing: str, repeats: int = 2) -> dict:
    """The Best-of-N scorer of dreamprm.bestofn over every candidate of every question (best of repeats)."""
    import time

    from dreamprm.model.loading import build_prm
    from dreamprm.model.processor import load_processor
    from dreamprm.bestofn.candidates import load_candidates
    from dreamprm.bestofn.scorer import ModelScorer
    questions = load_candidates(candidates)
    scorer = ModelScorer(build_prm(model, "hidden", seed=0), load_processor(model), torch.device("cpu"),
                         batch_size=8, max_image_side=512, packing=packing)
    best, scores = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        scores = scorer(questions)
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "chains": sum(len(q.candidates) for q in questions), "scores": scores}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "runs" / "packing"), help="folder for the task, model and runs")
    p.add_argument("--batch_size", type=int, default=8, help="training records per batch (as --batch_size)")
    p.add_argument("--segments", type=int, default=3, help="timed training segments per arm (after a warm-up)")
    p.add_argument("--skip_timing", action="store_true", help="tokens and FLOPs only")
    p.add_argument("--out", default=None, help="JSON results (default: WORK/results.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    from dreamprm.model.processor import load_processor
    model_448 = tiny_model_at(work / "tiny-448", 448)
    task = make_long_task(work / "long_task")
    demo_model = work / "tiny"
    from dreamprm.model.tiny import build_tiny_qwen2vl
    build_tiny_qwen2vl(demo_model)
    quality = work / "quality_task"
    if not (quality / "test.json").is_file():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality" / "make_task.py"), "--out", str(quality),
                        "--seed", "0"], check=True, capture_output=True)
    results: dict = {"tokens": {}}
    print(f"{'data':<40}{'rows':>7}{'packed':>7}{'tokens':>9}{'packed':>9}{'saving':>8}{'2B FLOPs':>9}")
    datasets = (("demo", REPO / "data" / "demo", demo_model, 4, "candidates.json"),
                ("quality task", quality, demo_model, 4, "test.json"),
                ("5-8 steps 448px", task, model_448, 256, "candidates.json"))
    for label, data, model, image_tokens, candidates in datasets:
        processor = load_processor(model)
        results["tokens"][label] = {
            "meta": token_table(f"{label}: meta chains", meta_layouts(data / "meta.json", processor), image_tokens),
            "train": token_table(f"{label}: training, batch {args.batch_size}",
                                 train_layouts(data / "train.json", processor, args.batch_size, False), image_tokens),
            "train_chain_batches": token_table(f"{label}: training, --chain_batches",
                                               train_layouts(data / "train.json", processor, args.batch_size, True),
                                               image_tokens),
            "candidates": token_table(f"{label}: Best-of-N candidates",
                                      candidate_layouts(data / candidates, processor), image_tokens),
        }
    if not args.skip_timing:
        results["time"] = {}
        print(f"\n{'wall time, CPU, tiny model, 1 rank':<40}{'per-prefix':>12}{'packed':>10}{'speed-up':>10}"
              "\n(training: --packing none against --packing chain --chain_batches, batch 8, 2 meta chains)")
        for label, data, model, _, candidates in datasets[::2]:  # the demo and the 5-8-step task
            arms = {mode: time_training(model, data, work / "runs" / f"{label}-{mode}".replace(" ", "_"), mode,
                                        args.segments, args.batch_size) for mode in ("none", "chain")}
            bon = {mode: time_best_of_n(model, data / candidates, mode) for mode in ("none", "chain")}
            gap = max(abs(a - b) for qa, qb in zip(bon["none"]["scores"], bon["chain"]["scores"])
                      for ca, cb in zip(qa, qb) for a, b in zip(ca, cb))
            entry = {mode: {**arms[mode], "best_of_n_s": bon[mode]["seconds"]} for mode in arms}
            entry["best_of_n_max_score_difference"] = gap
            results["time"][label] = entry
            for key, name in (("lower_step_tokens", "lower step (tokens)"), ("lower_step_s", "lower step (s)"),
                              ("upper_step_s", "upper step (s)"),
                              ("segment_s", "segment: 5 lower + 1 upper (s)"), ("best_of_n_s", "Best-of-N, all chains (s)")):
                a, b = entry["none"][key], entry["chain"][key]
                print(f"{label + ': ' + name:<40}{a:>12.{0 if 'tokens' in key else 3}f}"
                      f"{b:>10.{0 if 'tokens' in key else 3}f}{a / b:>9.2f}x", flush=True)
            print(f"{label + ': Best-of-N max |logit difference|':<40}{gap:>12.1e}", flush=True)
    out = Path(args.out or work / "results.json")
    out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
