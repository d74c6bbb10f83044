"""The generative head (`--head generative`): chat layout one step per turn, judgement tokens read by
the language-model head, one sequence per chain, its lower loss and its export. In process, on the
tiny Qwen2-VL."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import DEMO
from dreamprm.config import ConfigError
from dreamprm.data.chat import ChainLayout, chain_layout, step_turns
from dreamprm.data.datasets import MetaDataset, TrainDataset
from dreamprm.data.packing import group_chain_records, make_collator
from dreamprm.data.records import load_meta_records, load_train_records
from dreamprm.losses import lower_loss, per_sample_bce, per_sample_mse
from dreamprm.model.judge import JudgeTokenError, parse_judge_tokens, resolve_judge_tokens
from dreamprm.model.loading import build_prm, export_prm, load_exported_prm
from dreamprm.model.prm import MODEL_KEYS
from dreamprm.model.processor import load_processor

GENERATIVE = chain_layout("generative")


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


@pytest.fixture(scope="module")
def processor(tiny_model):
    return load_processor(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model):
    return build_prm(tiny_model, "generative", seed=0, attn_implementation="sdpa").eval()


def meta_items(count: int = 4) -> list[dict]:
    dataset = MetaDataset(load_meta_records(DEMO / "meta.json")[:count])
    return [dataset[i] for i in range(count)]


def test_one_step_per_turn_with_earlier_judgements_positive(processor):
    prefixes = meta_items(1)[0]["texts"]
    texts = [GENERATIVE.chat_text(processor.tokenizer, p) for p in prefixes]
    # prefix j's conversation is the start of prefix j+1's: one sequence holds the whole chain
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    last = texts[-1]
    assert last.count("<|im_start|>user") == len(prefixes) == len(step_turns(prefixes[-1]))
    assert last.count("<|im_start|>assistant\n+<|im_end|>") == len(prefixes) - 1
    assert last.endswith("<|im_start|>assistant\n") and last.count("<|image_pad|>") == 1
    # the scalar heads keep the original's one user turn
    assert ChainLayout().chat_text(processor.tokenizer, prefixes[-1]).count("<|im_start|>user") == 1


def test_score_is_log_p_plus_minus_log_p_minus_at_the_generation_prompt(processor, model):
    batch = make_collator(processor, "none", GENERATIVE)(meta_items(2))
    with torch.no_grad():
        got = model(**inputs(batch))
        full = model.backbone(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                       "image_grid_thw", "mm_token_type_ids")}).logits
    log_p = torch.log_softmax(full.double(), dim=-1)[torch.arange(full.shape[0]), batch["score_index"]]
    plus, minus = model.judge_ids
    assert model.judge_ids == resolve_judge_tokens(processor.tokenizer, "+,-")
    torch.testing.assert_close(got.double(), log_p[:, plus] - log_p[:, minus], atol=1e-5, rtol=0)
    # P(+) over {+, -} is sigmoid of the score
    two_way = torch.softmax(log_p[:, [plus, minus]], dim=-1)[:, 0]
    torch.testing.assert_close(torch.sigmoid(got.double()), two_way, atol=1e-6, rtol=0)


def test_one_sequence_per_chain_scores_like_one_prefix_at_a_time(processor, model):
    items = meta_items(4)
    flat = make_collator(processor, "none", GENERATIVE)(items)
    packed = make_collator(processor, "chain", GENERATIVE)(items)
    # every prefix lies on its chain's spine: no branch tokens, the row is the longest conversation
    length = packed["input_ids"].shape[1]
    assert not (packed["packed_branch_start"] < torch.arange(length)).any()
    longest = [int(flat["attention_mask"][flat["item_index"] == i].sum(1).max()) for i in range(len(items))]
    assert packed["attention_mask"].sum(1).tolist() == longest
    with torch.no_grad():
        a, b = model(**inputs(flat)), model(**inputs(packed))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_training_records_of_one_chain_share_one_sequence(processor, model):
    records = load_train_records(DEMO / "train.json")[:12]
    groups = group_chain_records(records)
    dataset = TrainDataset(records, {"clean": 0, "inverted": 1, "noisy_30": 2, "noisy_80": 3})
    items = [{**dataset[i], "group": groups[i]} for i in range(len(records))]
    flat = make_collator(processor, "none", GENERATIVE)(items)
    packed = make_collator(processor, "chain", GENERATIVE)(items)
    assert packed["input_ids"].shape[0] == len({g for g in groups if g is not None}) + groups.count(None)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs(flat)), model(**inputs(packed)), atol=1e-5, rtol=0)


def test_judge_tokens_that_are_not_single_tokens_are_refused(tiny_model, processor):
    with pytest.raises(JudgeTokenError, match=r"'\+,-' \(e\.g\.|two different"):
        parse_judge_tokens("+")
    with pytest.raises(JudgeTokenError, match="two different"):
        parse_judge_tokens("+,+")
    with pytest.raises(ConfigError, match=r"--judge_tokens 'correct so far,-': 'correct so far' is \d+ tokens in "
                                          r"the tokenizer of .*choose judgements that are single tokens"):
        build_prm(tiny_model, "generative", seed=0, judge_tokens="correct so far,-")


def test_unsupported_backbone_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match=r"config.json: model_type: 'bert' has no PRM adapter; supported backbones"):
        build_prm(tmp_path, "generative", seed=0)


def test_generative_lower_loss_bce_against_soft_targets():
    z = torch.tensor([-2.0, 0.0, 1.5, 3.0], requires_grad=True)
    y = torch.tensor([0.0, 0.25, 0.5, 1.0])
    p = torch.sigmoid(z.detach())
    expected = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    loss = per_sample_bce(z, y)
    torch.testing.assert_close(loss.detach(), expected)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    torch.testing.assert_close(grad, p - y)  # d BCE / d logit = P(+) - accuracy
    assert lower_loss("generative") is per_sample_bce
    assert lower_loss("generative", "mse") is per_sample_mse
    assert lower_loss("logits", "bce") is per_sample_mse and lower_loss("hidden") is per_sample_mse


def test_export_is_a_plain_hf_folder_and_reloads(tmp_path, processor, model):
    out = export_prm(tmp_path / "export", model.state_dict(), model, processor, {"judge_tokens": "+,-"})
    assert not (out / "score_head.safetensors").exists()  # no parameters beyond the backbone
    meta = json.loads((out / "prm_config.json").read_text())
    assert meta["head"] == "generative" and meta["judge_ids"] == list(model.judge_ids)
    backbone = AutoModelForImageTextToText.from_pretrained(out)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(backbone.state_dict()[name], tensor), name
    loaded, _, _ = load_exported_prm(out)
    batch = make_collator(processor, "chain", GENERATIVE)(meta_items(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs(batch)), model(**inputs(batch)), atol=0, rtol=0)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "internvl"])
def other_backbone(request, tmp_path_factory):
    from dreamprm.model.tiny import build_tiny_qwen2vl
    return request.param, build_tiny_qwen2vl(tmp_path_factory.mktemp(request.param) / "tiny", arch=request.param)


@pytest.mark.parametrize("head", ["logits", "hidden", "generative"])
def test_every_head_on_qwen2_5_vl_and_internvl_packs_exactly(other_backbone, head, tmp_path):
    """Qwen2.5-VL (M-RoPE) and InternVL (1-D rotary) through their adapters: each head's packed chains
    score as one prefix at a time; the export is a folder AutoModelForImageTextToText loads."""
    arch, path = other_backbone
    processor = load_processor(path)
    model = build_prm(path, head, seed=0, attn_implementation="sdpa").eval()
    assert model.backbone.config.model_type == arch == model.adapter.family
    layout = chain_layout(head)
    items = meta_items(3)
    flat = make_collator(processor, "none", layout, model.adapter)(items)
    packed = make_collator(processor, "chain", layout, model.adapter)(items)
    assert packed["position_ids"].shape[1] == (3 if arch == "qwen2_5_vl" else 1)
    with torch.no_grad():
        a, b = model(**inputs(flat)), model(**inputs(packed))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    if arch == "qwen2_5_vl":  # the packed M-RoPE positions are the model's own
        reference, _ = model.backbone.model.get_rope_index(
            flat["input_ids"], flat["mm_token_type_ids"], flat["image_grid_thw"], attention_mask=flat["attention_mask"])
        s = int(flat["attention_mask"].sum(1).argmax())  # the longest text: a whole packed row
        real = flat["attention_mask"][s].bool()
        row = int(packed["score_row"][s])
        assert torch.equal(packed["position_ids"][row][:, :int(real.sum())], reference[:, s][:, real])
    if head == "generative":
        out = export_prm(tmp_path / "export", model.state_dict(), model, processor, {"judge_tokens": "+,-"})
        assert type(AutoModelForImageTextToText.from_pretrained(out)).__name__ == type(model.backbone).__name__
        loaded, loaded_processor, _ = load_exported_prm(out)
        assert type(loaded_processor) is type(processor)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs(packed)), b, atol=0, rtol=0)
