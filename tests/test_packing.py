"""Prefix packing (dreamprm/data/packing.py): one sequence per chain scores every step prefix
exactly as the per-prefix forward does. Layout and positions against the processor and the model's
own `get_rope_index`; scores, gradients and an optimiser step against per-prefix on one process
(both heads, SDPA and eager); scores, one ZeRO-3 training step and the hypergradient on 2 ranks."""
from __future__ import annotations

import subprocess

import pytest
import torch
from PIL import Image

from conftest import DEMO, REPO, base_env, launch_command, read_json
from dreamprm.data.datasets import MetaDataset, PRMCollator, TrainDataset
from dreamprm.data.packing import PackedPRMCollator, group_chain_records, pack_sequences, rope_positions, row_members
from dreamprm.data.records import load_meta_records, load_train_records
from dreamprm.model.loading import build_prm
from dreamprm.model.prm import MODEL_KEYS
from dreamprm.model.processor import load_processor

INPUTS = MODEL_KEYS


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in INPUTS}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model's matrices gain nothing from a second thread, and on a loaded 2-core machine
    # the thread pool made each forward+backward ~20x slower (measured: 3.4 s vs 0.13 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor(tiny_model):
    return load_processor(tiny_model)


def meta_items(count: int = 5) -> list[dict]:
    """Demo meta chains (2-4 steps) with images of different sizes and aspect ratios, so that rows pad
    and the image grids are not square (M-RoPE continues after max(h, w))."""
    dataset = MetaDataset(load_meta_records(DEMO / "meta.json")[:count])
    sizes = [(56, 56), (112, 56), (56, 140), (84, 84), (168, 112)]
    return [{**dataset[i], "image": dataset[i]["image"].resize(sizes[i % len(sizes)])} for i in range(count)]


def train_items(count: int = 12) -> list[dict]:
    """The first demo training records in chain order, with their chain groups (4 chains here)."""
    records = load_train_records(DEMO / "train.json")[:count]
    groups = group_chain_records(records)
    dataset = TrainDataset(records, {"clean": 0, "inverted": 1, "noisy_30": 2, "noisy_80": 3})
    return [{**dataset[i], "group": groups[i]} for i in range(count)]


def test_layout_spine_branches_and_what_each_token_sees():
    layout = pack_sequences([[5, 6, 7, 1, 2], [5, 6, 7, 8, 1, 2], [5, 6, 7, 8, 9, 1, 2]])
    # spine: the longest sequence; branches: the suffix [1, 2] of the two shorter ones
    assert layout.source == [(2, i) for i in range(7)] + [(0, 3), (0, 4), (1, 4), (1, 5)]
    assert layout.visible == [1, 2, 3, 4, 5, 6, 7, 3, 3, 4, 4]
    assert layout.branch_start == [0, 1, 2, 3, 4, 5, 6, 7, 7, 9, 9]
    assert layout.score_index == [8, 10, 6]
    # a sequence lying wholly on the spine is scored there, without a branch
    assert pack_sequences([[1, 2], [1, 2, 3]]).score_index == [1, 2]


def test_packed_rows_rebuild_every_per_prefix_sequence(processor, tiny_model):
    """Following a scored token's visible keys back through the packed row gives exactly the
    per-prefix token ids, token types and the positions the model itself computes."""
    items = meta_items()
    flat = PRMCollator(processor)(items)
    packed = PackedPRMCollator(processor)(items)
    model = build_prm(tiny_model, "hidden", seed=0)
    reference_positions, _ = model.backbone.model.get_rope_index(
        flat["input_ids"], flat["mm_token_type_ids"], flat["image_grid_thw"], attention_mask=flat["attention_mask"])
    for s in range(flat["input_ids"].shape[0]):
        row, q = int(packed["score_row"][s]), int(packed["score_index"][s])
        vis, start = int(packed["packed_visible"][row, q]), int(packed["packed_branch_start"][row, q])
        keys = sorted(set(range(vis)) | set(range(start, q + 1)))
        real = flat["attention_mask"][s].bool()
        assert packed["input_ids"][row, keys].tolist() == flat["input_ids"][s][real].tolist()
        assert packed["mm_token_type_ids"][row, keys].tolist() == flat["mm_token_type_ids"][s][real].tolist()
        assert torch.equal(packed["position_ids"][row][:, keys], reference_positions[:, s][:, real])
    # one image per chain instead of one per prefix, with the same patches
    assert packed["image_grid_thw"].shape[0] == len(items) < flat["image_grid_thw"].shape[0]
    patches = flat["image_grid_thw"].prod(-1)
    starts = torch.cumsum(patches, 0) - patches
    first_rows = [int((flat["item_index"] == i).nonzero()[0]) for i in range(len(items))]
    expected = torch.cat([flat["pixel_values"][starts[r]:starts[r] + patches[r]] for r in first_rows])
    assert torch.equal(packed["pixel_values"], expected)
    assert packed["attention_mask"].sum() < 0.6 * flat["attention_mask"].sum()


def test_rope_positions_follow_the_model_on_a_non_square_grid(processor, tiny_model):
    image = Image.new("RGB", (140, 56), (10, 200, 10))
    batch = PRMCollator(processor)([{"image": image, "texts": ["Q?\n\nStep 1: yes"], "domain": 0, "target": 1.0}])
    model = build_prm(tiny_model, "hidden", seed=0)
    expected, _ = model.backbone.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                      batch["image_grid_thw"])
    got = rope_positions(batch["mm_token_type_ids"][0].tolist(), batch["image_grid_thw"].tolist(),
                         processor.image_processor.merge_size)
    assert torch.equal(got, expected[:, 0])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("head", ["logits", "hidden"])
def test_packed_scores_and_gradients_equal_per_prefix(tiny_model, processor, head, attention):
    torch.manual_seed(0)
    model = build_prm(tiny_model, head, seed=3, attn_implementation=attention)
    for items in (meta_items(), train_items()):
        flat = PRMCollator(processor)(items)
        packed = PackedPRMCollator(processor)(items)
        assert packed["input_ids"].shape[0] < flat["input_ids"].shape[0]
        for key in ("item_index", "domain", "target"):
            assert torch.equal(packed[key], flat[key]), key
        grads = []
        for batch in (flat, packed):
            model.zero_grad(set_to_none=True)
            logits = model(**inputs(batch))
            loss = (torch.sigmoid(logits) - batch["target"][batch["item_index"]]).pow(2).sum()
            loss.backward()
            grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
        (a, ga), (b, gb) = grads
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        assert ga.keys() == gb.keys()
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_tokenization_that_does_not_nest_is_still_exact(tiny_model, processor):
    """BPE can tokenise the end of a shorter text differently from the same characters inside a longer
    one; the branch then starts earlier and carries those tokens, and scores stay exact."""
    base = "How many circles?\n\nStep 1: I count the "
    tok = processor.tokenizer
    pairs = [(base + a, base + b) for a, b in (("circ", "circles"), ("re", "red"), ("squ", "squares"), ("to", "total"))]
    diverging = [(a, b) for a, b in pairs if tok(b)["input_ids"][:len(tok(a)["input_ids"])] != tok(a)["input_ids"]]
    assert diverging, "no non-nesting pair found for this tokenizer"
    image = Image.new("RGB", (56, 84), (0, 0, 250))
    items = [{"image": image, "texts": list(pair), "domain": -1, "target": 1.0} for pair in diverging]
    model = build_prm(tiny_model, "logits", seed=0).eval()
    with torch.no_grad():
        a = model(**inputs(PRMCollator(processor)(items)))
        b = model(**inputs(PackedPRMCollator(processor)(items)))
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_one_optimiser_step_gives_the_same_parameters(tiny_model, processor):
    params = []
    for collate in (PRMCollator(processor), PackedPRMCollator(processor)):
        model = build_prm(tiny_model, "logits", seed=1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # why 1e-4: tests/packing_ranks.py
        batch = collate(train_items())
        per_sample = (torch.sigmoid(model(**inputs(batch))) - batch["target"]) ** 2
        weights = torch.tensor([1.5, 0.2, 1.0, 0.8])[batch["domain"]]
        ((weights * per_sample).sum() / per_sample.numel()).backward()
        optimizer.step()
        params.append(dict(model.named_parameters()))
    for name, p in params[0].items():
        torch.testing.assert_close(params[1][name], p, rtol=0, atol=1e-5, msg=name)


def test_chain_groups_nest_and_share_one_row_wherever_they_sit_in_the_batch(tiny_model, processor):
    items = train_items()
    groups = [item["group"] for item in items]
    assert groups.count(None) == 0 and len(set(groups)) == 4  # 12 records = 4 whole chains
    rows = row_members(items)
    assert len(rows) == 4 and sorted(i for r in rows for i in r) == list(range(12))
    for r in rows:
        texts = [items[i]["texts"][0] for i in r]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    # Independently sampled records: a chain's records scattered over the batch still share a row,
    # and the batch keeps the records' order (targets, domains, scores).
    shuffled = [items[i] for i in (5, 0, 9, 3, 11, 1, 7, 2, 10, 4, 8, 6)]
    flat, packed = PRMCollator(processor)(shuffled), PackedPRMCollator(processor)(shuffled)
    assert packed["input_ids"].shape[0] == 4
    for key in ("item_index", "domain", "target"):
        assert torch.equal(packed[key], flat[key]), key
    model = build_prm(tiny_model, "hidden", seed=4).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs(packed)), model(**inputs(flat)), rtol=0, atol=1e-5)
    # a record whose text does not extend the previous one starts its own group
    records = load_train_records(DEMO / "train.json")[:3]
    broken = [records[0], records[2].__class__(**{**records[2].__dict__, "text": "other"}), records[1]]
    assert group_chain_records(broken)[1] is None
    # so does one with another question (`input`), even when its text extends the previous one
    other = records[1].__class__(**{**records[1].__dict__, "question": "another question"})
    assert group_chain_records([records[0], other]) == [None, None]


def test_flash_attention_is_refused_with_a_clear_message():
    from dreamprm.model.prm import packed_attention_mask
    with pytest.raises(ValueError, match="sdpa"):
        packed_attention_mask(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long),
                              "flash_attention_2", torch.float32)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_zero3_ranks_score_step_and_hypergradient_the_same_packed_or_not(tiny_model, tmp_path):
    out = tmp_path / "ranks.json"
    proc = subprocess.run(launch_command(REPO / "tests" / "packing_ranks.py", [str(tiny_model), str(out)], 2),
                          cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = read_json(out)
    assert report["world_size"] == 2
    for head in ("logits", "hidden"):
        entry = report[head]
        assert entry["meta_score_diff"] <= 1e-5 and entry["train_score_diff"] <= 1e-5, (head, entry)
        assert entry["grad_rel_error"] <= 1e-5, (head, entry)
        for objective in ("pairwise", "mse"):
            hyper = entry[f"hypergradient_{objective}"]
            assert max(abs(x) for x in hyper["none"]) > 0 and sum(x != 0 for x in hyper["none"]) >= 3, hyper
            assert entry[f"hypergradient_{objective}_cosine"] >= 0.9999, (head, objective, entry)
        assert entry["param_moved"] >= 1e-4 and entry["param_diff"] <= 1e-5, (head, entry)
    for kind in ("meta", "train"):
        assert report["tokens"]["chain"][kind] < 0.7 * report["tokens"]["none"][kind], report["tokens"]


def test_selecting_one_domains_records_of_a_packed_batch(tiny_model, processor):
    """What the exact hypergradient does per domain (select_rows): the packed sub-batch scores the
    chosen records as the per-prefix sub-batch does, also when a row holds records not chosen."""
    from dreamprm.data.datasets import select_rows
    items = train_items(14)
    flat, packed = PRMCollator(processor)(items), PackedPRMCollator(processor)(items)
    model = build_prm(tiny_model, "hidden", seed=2).eval()
    for records in (torch.nonzero(flat["domain"] == 0).flatten(), torch.tensor([0]), torch.tensor([2, 5, 13])):
        a, b = select_rows(flat, records), select_rows(packed, records)
        assert torch.equal(a["target"], b["target"]) and torch.equal(a["domain"], b["domain"])
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs(b)), model(**inputs(a)), rtol=0, atol=1e-5)


def test_chain_units_keep_chains_together_and_batches_count_records():
    from dreamprm.data.packing import chain_units
    from dreamprm.data.sampler import DistributedBatchSampler
    records = load_train_records(DEMO / "train.json")
    groups = group_chain_records(records)
    units = chain_units(groups)
    assert sorted(i for u in units for i in u) == list(range(len(records)))
    assert all(len({groups[i] for i in u}) == 1 for u in units)
    lengths = [len(r.text) for r in records]
    one = DistributedBatchSampler(lengths, 8, seed=3, units=units)
    two = [DistributedBatchSampler(lengths, 4, num_replicas=2, rank=r, seed=3, units=units) for r in (0, 1)]
    batches = one.global_batches(0)
    assert all(len(b) == 8 for b in batches) and len(batches) == len(records) // 8
    assert [a + b for a, b in zip(*(list(s) for s in two))] == batches  # 2 ranks see the same global batches
    # chains stay contiguous: a group's records in one batch are adjacent
    for batch in batches:
        seen = [groups[i] for i in batch]
        runs = [g for k, g in enumerate(seen) if g is not None and (k == 0 or seen[k - 1] != g)]
        assert len(runs) == len(set(runs))
    assert one.global_batches(1) != batches  # a new order every epoch


def test_a_tiny_qwen2_5_vl_packs_exactly_too(tiny_model, processor, tmp_path):
    """Qwen2.5-VL (window-attention vision tower, the same image rope rule) through the same path."""
    import shutil

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig
    shutil.copytree(tiny_model, tmp_path / "q25")
    base = Qwen2VLConfig.from_pretrained(tiny_model)
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=base.text_config.hidden_size,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=base.text_config.to_dict(), vision_config=vision,
                              image_token_id=base.image_token_id, video_token_id=base.video_token_id,
                              vision_start_token_id=base.vision_start_token_id,
                              vision_end_token_id=base.vision_end_token_id)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(tmp_path / "q25")
    model = build_prm(tmp_path / "q25", "logits", seed=0).eval()
    assert type(model.backbone).__name__ == "Qwen2_5_VLForConditionalGeneration"
    items = meta_items()
    with torch.no_grad():
        a = model(**inputs(PRMCollator(processor)(items)))
        b = model(**inputs(PackedPRMCollator(processor)(items)))
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
