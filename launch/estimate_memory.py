"""DeepSpeed's ZeRO-3 memory estimate for the Qwen2-VL-2B / 7B and InternVL3-1B reward models, and
the disk their checkpoints take, without downloads.

The parameter counts come from the public configs: the model is built from a ``Qwen2VLConfig`` (an
``InternVLConfig`` for InternVL3-1B, the ``-hf`` layout) on the ``meta`` device (no memory, no
weights), its parameters are counted exactly, and the largest
single module (DeepSpeed's "largest layer": the one it must gather whole) is found the way
``deepspeed.runtime.zero.stage3.model_to_params`` does. Those two numbers go to
``estimate_zero3_model_states_mem_needs_all_cold``. Without transformers a closed-form count of the
same architecture is used (it agrees exactly; ``--check`` compares the two).

The estimate covers model states only (fp16/bf16 parameters, gradients, fp32 Adam master + moments)
with DeepSpeed's 1.5 buffer factor; activations, the bilevel step's extra copies and the CUDA
context come on top.

Checkpoint sizes come from ``dreamprm.checkpoint.estimate_checkpoint_bytes``, the estimate the
trainer checks against the free disk space before its first save: every rank writes its partition of
the fp32 master weights and AdamW's two moments (12 bytes per parameter); a ZeRO-3 checkpoint holds
no 16-bit copy. The export is the 16-bit weights once. A run needs ``--keep_last`` + 1 checkpoints
at its peak (the old ones are deleted only once the new one is complete) plus the export.

    python launch/estimate_memory.py                      # the README table: 2B 1x8, 7B 1x8 and 2x8, InternVL3-1B 1x8
    python launch/estimate_memory.py --model 7b --nodes 2 --gpus_per_node 8
    python launch/estimate_memory.py --markdown           # the tables in slurm/README.md
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import sys

# The repository root on the import path, so that dreamprm/ imports without an install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dreamprm.checkpoint import estimate_checkpoint_bytes  # noqa: E402
from dreamprm.config import RunConfig  # noqa: E402

# Public config.json of Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2-VL-7B-Instruct (the fields that
# change the parameter count).
VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, in_channels=3, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2)
QWEN2_VL = {
    "2b": dict(name="Qwen/Qwen2-VL-2B-Instruct", hidden_size=1536, num_hidden_layers=28,
               num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
               vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(name="Qwen/Qwen2-VL-7B-Instruct", hidden_size=3584, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
               vocab_size=152064, tie_word_embeddings=False),
}
# Public config.json of OpenGVLab/InternVL3-1B-hf (transformers' InternVLForConditionalGeneration):
# InternViT-300M (448 px, patch 14, q/k/v biases, layer scale) + pixel-shuffle MLP projector +
# Qwen2.5-0.5B with an untied lm_head. 938,193,024 parameters, as its model card's "938M".
INTERNVL_VISION = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       image_size=448, patch_size=14, downsample_ratio=0.5)
INTERNVL3 = {
    "internvl3-1b": dict(name="OpenGVLab/InternVL3-1B-hf", hidden_size=896, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                         vocab_size=151674, tie_word_embeddings=False),
}
MODELS = {**QWEN2_VL, **INTERNVL3}  # every model this script knows: text sizes under the same keys
LABELS = {"2b": "Qwen2-VL-2B", "7b": "Qwen2-VL-7B", "internvl3-1b": "InternVL3-1B"}
# (model, nodes, GPUs per node) printed by default and tabulated in slurm/README.md.
DEFAULT_SETUPS = (("2b", 1, 8), ("7b", 1, 8), ("7b", 2, 8), ("internvl3-1b", 1, 8))
GIB = 2**30


@dataclasses.dataclass
class ParamCount:
    total: int
    largest_layer: int
    largest_layer_name: str
    method: str  # "meta" (instantiated) or "formula"


def build_config(model: str):
    """A transformers ``Qwen2VLConfig`` equal to the public one in every size field."""
    from transformers import Qwen2VLConfig

    spec = dict(QWEN2_VL[model])
    spec.pop("name")
    tie = spec.pop("tie_word_embeddings")
    vision = dict(VISION, hidden_size=spec["hidden_size"])  # the merger's output width
    text = dict(spec, max_window_layers=spec["num_hidden_layers"],
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    try:  # transformers >= 4.5x: nested text_config
        cfg = Qwen2VLConfig(text_config=dict(text, tie_word_embeddings=tie),
                            vision_config=vision, tie_word_embeddings=tie)
    except TypeError:
        cfg = None
    text_cfg = getattr(cfg, "text_config", None)
    if cfg is None or getattr(text_cfg, "hidden_size", None) != spec["hidden_size"]:
        cfg = Qwen2VLConfig(**text, vision_config=vision, tie_word_embeddings=tie)  # older layout
    return cfg


def build_internvl(model: str):
    """transformers' InternVLForConditionalGeneration, equal to the public ``-hf`` one in every size field,
    on the meta device."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    spec, v = dict(INTERNVL3[model]), INTERNVL_VISION
    spec.pop("name")
    tie = spec.pop("tie_word_embeddings")
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
                           num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
                           image_size=[v["image_size"]] * 2, patch_size=[v["patch_size"]] * 2, attention_bias=True,
                           use_mean_pooling=True, layer_scale_init_value=0.1),
        text_config=dict(spec, model_type="qwen2", tie_word_embeddings=tie),
        downsample_ratio=v["downsample_ratio"], projector_hidden_act="gelu", tie_word_embeddings=tie)
    return InternVLForConditionalGeneration(cfg)


def count_params_meta(model: str) -> ParamCount:
    """Instantiate the model (Qwen2VLForConditionalGeneration, InternVLForConditionalGeneration) on the
    meta device and count."""
    import torch

    with torch.device("meta"):
        if model in INTERNVL3:
            net = build_internvl(model)
        else:
            from transformers import Qwen2VLForConditionalGeneration
            net = Qwen2VLForConditionalGeneration(build_config(model))
    # parameters() yields a tied weight once. (DeepSpeed's model_to_params dedups by data_ptr,
    # which is 0 for every meta tensor, so it cannot be used here.)
    total = sum(p.numel() for p in net.parameters())
    largest, largest_name = 0, ""
    for name, mod in net.named_modules():
        n = sum(p.numel() for p in mod.parameters(recurse=False))
        if n > largest:
            largest, largest_name = n, name
    return ParamCount(total, largest, largest_name, "meta")


def count_params_formula(model: str) -> ParamCount:
    """Closed-form count of the same architecture (biases on q/k/v only, RMSNorm weights)."""
    s = MODELS[model]
    h, inter, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    head_dim = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * head_dim
    attn = (h * h + h) + 2 * (h * kv + kv) + h * h  # q (+bias), k, v (+bias), o
    layer = attn + 3 * h * inter + 2 * h  # gate/up/down, two RMSNorms
    embed = v * h
    text = embed + s["num_hidden_layers"] * layer + h + (0 if s["tie_word_embeddings"] else embed)
    if model in INTERNVL3:
        return ParamCount(text + internvl_vision_formula(h), embed, "model.language_model.embed_tokens", "formula")

    e, ratio = VISION["embed_dim"], VISION["mlp_ratio"]
    patch = VISION["in_channels"] * VISION["temporal_patch_size"] * VISION["patch_size"] ** 2 * e
    block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) \
        + (e * ratio * e + ratio * e) + (ratio * e * e + e)  # 2 LayerNorms, qkv, proj, fc1, fc2
    merged = e * VISION["spatial_merge_size"] ** 2
    merger = 2 * e + (merged * merged + merged) + (merged * h + h)  # LayerNorm, 2-layer MLP
    vision = patch + VISION["depth"] * block + merger
    return ParamCount(text + vision, embed, "model.language_model.embed_tokens", "formula")


def internvl_vision_formula(text_hidden: int) -> int:
    """InternViT (cls token, absolute positions, q/k/v/o with biases, two LayerNorms and two layer-scale
    vectors per block, no final norm with mean pooling) plus the projector (LayerNorm over the
    pixel-shuffled width, two linears)."""
    v = INTERNVL_VISION
    e, inter = v["hidden_size"], v["intermediate_size"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    embeddings = e + (patches + 1) * e + (3 * v["patch_size"] ** 2 * e + e)
    block = 2 * e + 4 * (e * e + e) + (e * inter + inter) + (inter * e + e) + 2 * 2 * e
    shuffled = int(e / v["downsample_ratio"] ** 2)
    projector = 2 * shuffled + (shuffled * text_hidden + text_hidden) + (text_hidden * text_hidden + text_hidden)
    return embeddings + v["num_hidden_layers"] * block + projector


def count_params(model: str) -> ParamCount:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return count_params_formula(model)
    return count_params_meta(model)


@dataclasses.dataclass
class Row:
    model: str
    nodes: int
    gpus_per_node: int
    offload_param: bool
    offload_optimizer: bool
    gpu_gib: float  # per GPU
    cpu_gib: float  # per node (DeepSpeed prints it as "per CPU")


def estimate_rows(model: str, count: ParamCount, nodes: int, gpus_per_node: int) -> list[Row]:
    """DeepSpeed's estimate with zero_init=1 (weights partitioned while loading, which is what
    HfDeepSpeedConfig + from_pretrained does) for: no offload, optimizer offload, both."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    rows = []
    for off_opt, off_param in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=count.total, largest_layer_params=count.largest_layer,
            num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=off_opt,
            cpu_offload_params=off_param, zero_init=True)
        rows.append(Row(model, nodes, gpus_per_node, off_param, off_opt, gpu / GIB, cpu / GIB))
    return rows


def markdown_table(rows: list[Row], counts: dict[str, ParamCount]) -> str:
    out = ["| model | params | largest layer | nodes x GPUs | offload | per GPU | CPU per node |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = counts[r.model]
        offload = ("params + optimizer" if r.offload_param
                   else "optimizer" if r.offload_optimizer else "none")
        out.append(f"| {LABELS[r.model]} | {c.total / 1e9:.3f} B | "
                   f"{c.largest_layer / 1e6:.0f} M | {r.nodes} x {r.gpus_per_node} | {offload} | "
                   f"{r.gpu_gib:.1f} GiB | {r.cpu_gib:.1f} GiB |")
    return "\n".join(out)


@dataclasses.dataclass
class DiskRow:
    model: str
    nodes: int
    gpus_per_node: int
    per_rank_gib: float  # one checkpoint, each rank's files
    checkpoint_gib: float  # one checkpoint, all ranks
    export_gib: float  # the exported 16-bit PRM
    run_gib: float  # peak of a run: keep_last + 1 checkpoints and the export


def disk_row(model: str, count: ParamCount, nodes: int, gpus_per_node: int, keep_last: int) -> DiskRow:
    per_rank, total = estimate_checkpoint_bytes(count.total, count.total, world_size=nodes * gpus_per_node)
    export = 2 * count.total
    return DiskRow(model, nodes, gpus_per_node, per_rank / GIB, total / GIB, export / GIB,
                   ((keep_last + 1) * total + export) / GIB)


def disk_table(rows: list[DiskRow], keep_last: int) -> str:
    out = [f"| model | nodes x GPUs | checkpoint per rank | checkpoint (all ranks) | export (bf16) | "
           f"a run with --keep_last {keep_last} |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {LABELS[r.model]} | {r.nodes} x {r.gpus_per_node} | {r.per_rank_gib:.1f} GiB | "
                   f"{r.checkpoint_gib:.1f} GiB | {r.export_gib:.1f} GiB | {r.run_gib:.0f} GiB |")
    return "\n".join(out)


def upper_fp32_extra(model: str, tokens: int) -> dict[str, float]:
    """Extra GPU memory (GiB) of the upper level's passes in fp32 arithmetic (--upper_precision fp32,
    dreamprm/model/precision.py) over the same passes in bf16, for one pass over `tokens` tokens.

    An estimate from the layer shapes, not a measurement: per token and decoder layer a backward
    keeps about 6h + 2·kv + 4·i activations (norm outputs, q/k/v, attention output, o-proj input; the
    MLP's gate, up, activation and product), i the MLP width; fp32 doubles their 2 bytes. With
    --gradient_checkpointing only each layer's input (h) is kept, plus one layer's activations while
    it is recomputed. The embedding table's gradient is summed in fp32: 2 more bytes per entry while
    it exists. Weights stay bf16 (never an fp32 copy)."""
    s = MODELS[model]
    h, i, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = s["num_key_value_heads"] * (h // s["num_attention_heads"])
    per_layer = 6 * h + 2 * kv + 4 * i  # activations kept per token and layer
    extra_bytes = 2  # fp32 over bf16
    return {"no_checkpointing": tokens * layers * per_layer * extra_bytes / GIB,
            "checkpointing": tokens * (layers * h + per_layer) * extra_bytes / GIB,
            "embedding_gradient": s["vocab_size"] * h * extra_bytes / GIB}


def upper_fp32_table(tokens: int) -> str:
    lines = [f"| model | + per pass of {tokens:,} tokens | with --gradient_checkpointing | + embedding gradient (transient) |",
             "|---|---:|---:|---:|"]
    for m in MODELS:
        e = upper_fp32_extra(m, tokens)
        lines.append(f"| {MODELS[m]['name']} | {e['no_checkpointing']:.1f} GiB | {e['checkpointing']:.2f} GiB "
                     f"| {e['embedding_gradient']:.2f} GiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="launch/estimate_memory.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), help="default: every default setup")
    p.add_argument("--nodes", type=int, help="default: 1 for 2b and internvl3-1b, 1 and 2 for 7b")
    p.add_argument("--gpus_per_node", type=int, help="default: 8")
    p.add_argument("--markdown", action="store_true", help="print only the summary table")
    p.add_argument("--formula", action="store_true",
                   help="count with the closed form instead of instantiating on the meta device")
    p.add_argument("--check", action="store_true",
                   help="also compare the meta-device count with the closed form")
    p.add_argument("--keep_last", type=int, default=RunConfig.keep_last,
                   help="the trainer's --keep_last, for the disk a run needs")
    p.add_argument("--upper_tokens", type=int, default=8192,
                   help="tokens of the largest upper-level pass per rank (the packed meta batch), for the cost "
                        "of --upper_precision fp32")
    args = p.parse_args(argv)
    bad = [f"--{name} must be >= {low}, got {value}" for name, low in (("nodes", 1), ("gpus_per_node", 1), ("keep_last", 0))
           if (value := getattr(args, name)) is not None and value < low]
    if bad:
        p.error("; ".join(bad))  # exit 2, one error line, before anything is computed
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # only the estimator is used; no device probe

    if args.model is None and args.nodes is None and args.gpus_per_node is None:
        setups = list(DEFAULT_SETUPS)
    else:
        models = [args.model] if args.model else list(MODELS)
        setups = []
        for m in models:
            node_list = [args.nodes] if args.nodes else [n for mm, n, _ in DEFAULT_SETUPS if mm == m]
            setups += [(m, n, args.gpus_per_node or 8) for n in node_list]

    counts: dict[str, ParamCount] = {}
    for m in dict.fromkeys(m for m, _, _ in setups):
        counts[m] = count_params_formula(m) if args.formula else count_params(m)
        if args.check:
            f = count_params_formula(m)
            ok = (f.total, f.largest_layer) == (counts[m].total, counts[m].largest_layer)
            print(f"{m}: {counts[m].method} {counts[m].total:,} / {counts[m].largest_layer:,}; "
                  f"formula {f.total:,} / {f.largest_layer:,}: {'match' if ok else 'MISMATCH'}")
            if not ok:
                return 1

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    rows: list[Row] = []
    disk: list[DiskRow] = []
    for m, nodes, gpn in setups:
        c = counts[m]
        rows += estimate_rows(m, c, nodes, gpn)
        disk.append(disk_row(m, c, nodes, gpn, args.keep_last))
        if args.markdown:
            continue
        print(f"\n== {MODELS[m]['name']}: {c.total:,} parameters ({c.method}); largest layer "
              f"{c.largest_layer_name} {c.largest_layer:,}")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            estimate_zero3_model_states_mem_needs_all_cold(
                total_params=c.total, largest_layer_params=c.largest_layer,
                num_gpus_per_node=gpn, num_nodes=nodes)
        print(buf.getvalue().rstrip())
        d = disk[-1]
        print(f"checkpoint: {d.per_rank_gib:.1f} GiB per rank, {d.checkpoint_gib:.1f} GiB in all; export "
              f"{d.export_gib:.1f} GiB; a run with --keep_last {args.keep_last}: {d.run_gib:.0f} GiB")
    if not args.markdown:
        print("\nSummary (zero_init=1; model states only, activations not included):")
    print(markdown_table(rows, counts))
    print("\nDisk: one checkpoint (ZeRO-3, fp32 master weights + AdamW moments) and what a run needs:"
          if not args.markdown else "")
    print(disk_table(disk, args.keep_last))
    if not args.markdown:
        print("\nUpper level in fp32 arithmetic (--upper_precision fp32, the default with bf16): extra activation "
              "memory per rank over bf16 passes (an estimate from the layer shapes):")
        print(upper_fp32_table(args.upper_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
