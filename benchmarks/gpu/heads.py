"""GPU benchmark: the scalar and the generative head, same backbone, same records, same card.

Builds the Qwen2-VL-2B architecture with random weights (no download; `bench.py`'s builder) and the
training records DreamPRM's train.json has, one record per step prefix (64 chains x 5 prefixes, one
448x448 image each), then runs `launch/train.py` (the real code path, the defaults users run: ZeRO-3,
bf16, `--hypergrad exact` with fp32 upper passes, the pairwise objective) once per head with the
prefixes of a chain in one sequence (`--packing chain --chain_batches`). Reported per head, from the
run's own TensorBoard scalars (the first logging window dropped as warm-up): scored steps/s (records
are step prefixes), tokens/s through the whole bi-level loop, the upper step's share of a segment, and
peak GPU memory. Prints a table last and writes JSON.

    python benchmarks/gpu/heads.py --out heads.json              # on a GPU
    python benchmarks/gpu/heads.py --tiny --segments 1           # smoke test on CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench import QWEN2VL_2B, TINY, build_model_dir, make_synthetic_data, our_trainer  # noqa: E402

HEADS = {"scalar (hidden)": ["--head", "hidden"], "generative": ["--head", "generative"]}
USERS_DEFAULTS = ["--precision", "bf16", "--hypergrad", "exact", "--meta_loss", "pairwise", "--meta_batch_size", "4", "--packing", "chain", "--chain_batches"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny architecture and images (CPU smoke test)")
    p.add_argument("--segments", type=int, default=2, help="timed 5-step segments per head (after a warm-up)")
    p.add_argument("--batch_size", type=int, default=8, help="records (step prefixes) per micro-batch")
    p.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "zero3.json"))
    p.add_argument("--workdir", default=None, help="reuses a model built there by an earlier run")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    arch, side, words = (TINY, 56, 60) if args.tiny else (QWEN2VL_2B, 448, 600)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dreamprm-heads-"))
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        build_model_dir(model_dir, arch, side)
    make_synthetic_data(work / "prefix_data", n_train=64, n_meta=8, image_side=side, words=words, prefixes=True)
    extra = ["--deepspeed", args.deepspeed] + USERS_DEFAULTS + ([] if on_gpu else ["--precision", "fp32", "--device", "cpu"])
    results = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "flags": " ".join(extra), "heads": {}}
    for name, flags in HEADS.items():
        r = our_trainer(model_dir, work / "prefix_data", work / name.split()[0], args.segments, args.batch_size,
                        extra + flags)
        r["scored_steps_per_s"] = r.pop("samples_per_s")
        r["tokens_per_scored_step"] = r["tokens_per_s_through_loop"] / r["scored_steps_per_s"]
        results["heads"][name] = r
        if args.out:  # after each head: a cut-off run keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"device: {results['device']}; {results['flags']}")
    print(f"{'head':<18}{'batch':>6}{'steps/s':>9}{'tokens/s':>10}{'tok/step':>10}{'upper share':>13}{'peak GiB':>10}")
    for name, r in results["heads"].items():
        print(f"{name:<18}{r['batch_size']:>6}{r['scored_steps_per_s']:>9.2f}{r['tokens_per_s_through_loop']:>10.0f}"
              f"{r['tokens_per_scored_step']:>10.1f}{r['upper_share']:>13.1%}{r['peak_memory_gib']:>10.1f}")
    return results


if __name__ == "__main__":
    main()
