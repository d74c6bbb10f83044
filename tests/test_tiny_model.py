"""The offline tiny Qwen2-VL: save/load round trip, a real forward + backward through the PRM on a
real PIL image, and the scored position's independence of the padding side."""
from __future__ import annotations

import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration

from conftest import DEMO
from dreamprm.model.prm import model_inputs
from dreamprm.data.datasets import PRMCollator, score_positions
from dreamprm.losses import per_sample_mse
from dreamprm.model.loading import build_prm
from dreamprm.model.processor import ImageOnlyQwen2VLProcessor, load_processor
from dreamprm.model.tiny import SPECIAL_TOKENS


def test_round_trip_through_save_pretrained(tiny_model, tmp_path):
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model)
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 1_000_000, n_params
    assert model.config.vision_config.depth >= 1  # the vision tower is really there
    model.save_pretrained(tmp_path / "again")
    again = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "again")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    processor = load_processor(tiny_model)
    assert isinstance(processor, ImageOnlyQwen2VLProcessor)
    for token in SPECIAL_TOKENS:
        assert processor.tokenizer.convert_tokens_to_ids(token) != processor.tokenizer.unk_token_id
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    processor.save_pretrained(tmp_path / "proc")
    processor.tokenizer.save_pretrained(tmp_path / "proc")
    reloaded = load_processor(tmp_path / "proc")
    text = "Step 1: 2 + 1 = 3"
    assert reloaded.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]


def test_prm_forward_backward_on_a_real_image(tiny_model):
    processor = load_processor(tiny_model)
    image = Image.open(sorted((DEMO / "images").glob("*.png"))[0]).convert("RGB")
    batch = PRMCollator(processor)([
        {"image": image, "texts": ["How many red shapes?\n\nStep 1: I count 2."], "domain": 0, "target": 1.0},
        {"image": image, "texts": ["How many?\n\nStep 1: Maybe 3 red circles and 1 red square."], "domain": 1, "target": 0.0},
    ])
    assert batch["image_grid_thw"].shape == (2, 3) and batch["pixel_values"].shape[0] > 0
    for head in ("logits", "hidden"):
        model = build_prm(tiny_model, head, seed=0)
        logits = model(**model_inputs(batch))
        assert logits.shape == (2,) and torch.isfinite(logits).all()
        per_sample_mse(logits, batch["target"]).mean().backward()
        vision_grad = model.backbone.model.visual.patch_embed.proj.weight.grad
        assert vision_grad is not None and vision_grad.abs().sum() > 0  # the image path is trained
        assert model.score_head.weight.grad.abs().sum() > 0


def test_score_position_is_the_last_real_token_on_either_padding_side(tiny_model):
    processor = load_processor(tiny_model)
    image = Image.open(sorted((DEMO / "images").glob("*.png"))[0]).convert("RGB")
    items = [{"image": image, "texts": ["short"], "domain": 0, "target": 0.5},
             {"image": image, "texts": ["a much longer text with many more tokens in it, Step 1: yes"],
              "domain": 0, "target": 0.5}]
    model = build_prm(tiny_model, "logits", seed=0).eval()
    scores = {}
    for side in ("right", "left"):
        processor.tokenizer.padding_side = side
        batch = PRMCollator(processor)(items)
        rows = torch.arange(2)
        # the scored token is the last real one: the assistant prompt's final newline
        assert (batch["attention_mask"][rows, batch["score_index"]] == 1).all()
        last_ids = batch["input_ids"][rows, batch["score_index"]]
        assert (last_ids == last_ids[0]).all()
        with torch.no_grad():
            scores[side] = model(**model_inputs(batch))
    processor.tokenizer.padding_side = "right"
    torch.testing.assert_close(scores["left"], scores["right"], rtol=1e-4, atol=1e-5)


def test_score_positions_examples():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert score_positions(mask).tolist() == [2, 4, 4]
