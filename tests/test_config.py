"""Flags and DeepSpeed config resolution (`dreamprm.config`).

The original DreamPRM's flags keep their names and types; DeepSpeed "auto" values come from the
flags; a typed flag that disagrees with a concrete JSON value is an error naming both.
"""
from __future__ import annotations

import argparse
import copy
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from dreamprm.bestofn.config import BestOfNConfig
from dreamprm.bestofn.config import build_parser as build_bestofn_parser
from dreamprm.config import (DEMO_DIR, SECTIONS, TINY_MODEL, ConfigError, TrainConfig, build_parser, load_ds_config,
                             parse_args, resolve_ds_config)
from dreamprm.flags import add_flags, flag, flag_type, values_of

REPO = Path(__file__).resolve().parent.parent
DS_CONFIGS = ["zero3.json", "zero3_offload.json", "zero2.json"]

# The original train script's flags, each with a value of its type.
ORIGINAL_FLAGS = {
    "train_json_file": ("/d/train.json", "data", str),
    "meta_json_file": ("/d/meta.json", "data", str),
    "weights_path": ("/out/run1", "run", str),
    "reward_model": ("/models/Qwen2-VL-2B-Instruct", "model", str),
    "iteration_num": ("100000", "run", int),
    "batch_size": ("2", "optim", int),
    "max_epoch": ("3", "run", int),
    "device": ("cuda", "run", str),
    "precision": ("fp16", "optim", str),
    "seed": ("7", "run", int),
    "local_rank": ("3", "run", int),
    "lr": ("5e-7", "optim", float),
    "meta_lr": ("0.01", "bilevel", float),
    "weight_decay": ("0.001", "optim", float),
    "meta_weight_decay": ("0.0", "bilevel", float),
    "scheduler_step_size": ("5000", "optim", int),
    "scheduler_gamma": ("0.5", "optim", float),
    "unroll_steps": ("5", "bilevel", int),
    "gradiant_accumulation": ("4", "optim", int),
    "save_every_iterations": ("1000", "run", int),
}


def cfg(*argv: str) -> TrainConfig:
    return parse_args(list(argv))


def resolve(ds, *argv, world_size=1, on_gpu=False, source="ds.json"):
    config = cfg(*argv)
    return resolve_ds_config(ds, config, world_size=world_size, on_gpu=on_gpu, source=source), config


def ds_file(name: str) -> dict:
    return load_ds_config(REPO / "ds_configs" / name)


def parse_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        cfg(*argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------- the original flag set
def test_original_flags_parse_with_their_names_and_types():
    argv = [a for name, (value, _, _) in ORIGINAL_FLAGS.items() for a in (f"--{name}", value)]
    config = cfg(*argv)
    for name, (value, section, typ) in ORIGINAL_FLAGS.items():
        got = getattr(getattr(config, section), name)
        assert type(got) is typ, name
        assert got == typ(value), name
    assert config.explicit_flags == frozenset(ORIGINAL_FLAGS)


@pytest.mark.parametrize("name", list(ORIGINAL_FLAGS))
def test_original_flag_is_documented_in_help(name):
    assert f"--{name}" in build_parser().format_help()


def test_gradient_accumulation_alias():
    a = cfg("--gradient_accumulation", "8")
    b = cfg("--gradiant_accumulation", "8")
    assert a.optim.gradiant_accumulation == b.optim.gradiant_accumulation == 8
    assert a.explicit_flags == b.explicit_flags == {"gradiant_accumulation"}


def test_equals_form_and_local_rank_from_launcher():
    config = cfg("--local_rank=0", "--batch_size=4", "--precision=fp32")
    assert config.run.local_rank == 0 and config.optim.batch_size == 4 and config.optim.precision == "fp32"
    assert config.explicit_flags == {"local_rank", "batch_size", "precision"}


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_precision_choices(precision):
    assert cfg("--precision", precision).optim.precision == precision


def test_defaults_run_the_demo_offline():
    config = cfg()
    assert config.data.train_json_file == str(DEMO_DIR / "train.json")
    assert config.data.meta_json_file == str(DEMO_DIR / "meta.json")
    assert config.model.reward_model == TINY_MODEL
    assert config.optim.precision == "bf16" and config.optim.batch_size == 1
    assert config.explicit_flags == frozenset()
    assert set(config.to_dict()) == {"data", "model", "optim", "bilevel", "run"}
    json.dumps(config.to_dict())  # saved with every run


def test_boolean_flags():
    config = cfg("--baseline", "--no-export")
    assert config.bilevel.baseline is True and config.run.export is False
    assert {"baseline", "export"} <= config.explicit_flags


@dataclass(frozen=True)
class Optional_:
    """Optional flags of each type; the annotations are strings here (`from __future__ import annotations`),
    as in every config dataclass."""
    count: int | None = flag(None, "an optional int", group="g")
    scale: float | None = flag(None, "an optional float", group="g")
    name: str | None = flag(None, "an optional str", group="g")
    steps: int = flag(3, "an int", group="g")
    on: bool = flag(False, "a bool", group="g")


def test_optional_flags_parse_as_their_type_not_as_str():
    parser = argparse.ArgumentParser()
    add_flags(parser, Optional_)
    got = values_of(Optional_, vars(parser.parse_args(["--count", "4", "--scale", "0.5", "--name", "x", "--on"])))
    assert got == Optional_(count=4, scale=0.5, name="x", steps=3, on=True)
    assert (type(got.count), type(got.scale), type(got.name)) == (int, float, str)
    assert values_of(Optional_, vars(parser.parse_args([]))) == Optional_()
    with pytest.raises(SystemExit):
        parser.parse_args(["--count", "four"])
    assert [flag_type(t) for t in (int | None, float | None, str | None, bool, int)] == [int, float, str, bool, int]
    with pytest.raises(TypeError):
        flag_type(int | str)


def test_every_train_and_bestofn_flag_has_its_fields_type():
    """One builder serves both entry points; each flag parses as its field's annotation says."""
    for parser, classes in ((build_parser(), SECTIONS.values()), (build_bestofn_parser(), [BestOfNConfig])):
        by_dest = {a.dest: a for a in parser._actions}
        for cls in classes:
            for name, annotation in typing.get_type_hints(cls).items():
                kind = flag_type(annotation)
                action = by_dest[name]
                assert (isinstance(action, argparse.BooleanOptionalAction) if kind is bool else action.type is kind), name


@pytest.mark.parametrize("argv,fragment", [
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--aggregation", "median"], "argument --aggregation: invalid choice: 'median'"),
    (["--hypergrad", "neumann"], "argument --hypergrad: invalid choice: 'neumann'"),
    (["--batch_size", "two"], "argument --batch_size: invalid int value: 'two'"),
    (["--batch_size", "1.5"], "argument --batch_size: invalid int value: '1.5'"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--unroll_steps", "0"], "--unroll_steps: must be >= 1, got 0"),
    (["--batch_size", "0"], "--batch_size: must be >= 1, got 0"),
    (["--gradient_accumulation", "0"], "--gradiant_accumulation: must be >= 1, got 0"),
    (["--iteration_num", "-5"], "--iteration_num: must be >= 1, got -5"),
    (["--lr", "-1"], "--lr: must be a positive number, got -1.0"),
    (["--lr", "nan"], "--lr: must be a positive number, got nan"),
    (["--meta_lr", "0"], "--meta_lr: must be a positive number, got 0.0"),
    (["--weight_decay", "-0.1"], "--weight_decay: must be a number >= 0, got -0.1"),
    (["--meta_weight_decay", "inf"], "--meta_weight_decay: must be a number >= 0, got inf"),
    (["--scheduler_gamma", "-1"], "--scheduler_gamma: must be a number >= 0, got -1.0"),
    (["--num_workers", "-1"], "--num_workers: must be >= 0, got -1"),
    (["--device", "tpu"], "--device: must be 'auto', 'cuda', 'cuda:N' or 'cpu', got 'tpu'"),
    (["--bogus_flag", "1"], "unrecognized arguments: --bogus_flag 1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_flags_exit_2_naming_the_flag(capsys, argv, fragment):
    err = parse_error(capsys, *argv)
    assert fragment in err
    assert err.rstrip().splitlines()[-1].startswith("launch/train.py: error: ")


# ---------------------------------------------------------------- "auto" values from the flags
@pytest.mark.parametrize("name", DS_CONFIGS)
def test_auto_values_resolve_from_flags(name):
    raw = ds_file(name)
    before = copy.deepcopy(raw)
    ds, config = resolve(raw, "--batch_size", "3", "--gradient_accumulation", "2", "--lr", "1e-5",
                         "--weight_decay", "0.02", "--precision", "fp32", world_size=4)
    assert raw == before  # the input is not modified
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["lr"] == 1e-5 and ds["optimizer"]["params"]["weight_decay"] == 0.02
    assert ds["zero_optimization"]["stage"] == before["zero_optimization"]["stage"]
    assert ds["fp16"]["loss_scale"] == 0  # concrete keys beside "auto" ones are kept
    assert "auto" not in json.dumps(ds)
    assert config.optim.batch_size == 3 and config.optim.precision == "fp32"


@pytest.mark.parametrize("name", DS_CONFIGS)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_auto(name, precision):
    ds, _ = resolve(ds_file(name), "--precision", precision)
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is (precision == "fp16")


@pytest.mark.parametrize("name", DS_CONFIGS)
def test_defaults_resolve(name):
    ds, config = resolve(ds_file(name))
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (1, 1, 1)
    assert ds["bf16"]["enabled"] is True and config.optim.precision == "bf16"
    assert ds["optimizer"]["params"]["lr"] == config.optim.lr


@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu", "gpu"])
def test_torch_adam_auto_depends_on_the_device(on_gpu):
    ds, _ = resolve(ds_file("zero3.json"), on_gpu=on_gpu)
    assert ds["optimizer"]["params"]["torch_adam"] is (not on_gpu)
    ds, _ = resolve(ds_file("zero3_offload.json"), on_gpu=on_gpu)
    assert "torch_adam" not in ds["optimizer"]["params"]


def test_missing_keys_count_as_auto_and_other_defaults():
    ds, _ = resolve({"gradient_clipping": "auto"}, "--batch_size", "2", world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 4
    assert ds["gradient_clipping"] == 1.0
    assert ds["steps_per_print"] == 10 ** 9
    assert "optimizer" not in ds


# ---------------------------------------------------------------- concrete JSON values
CONFLICTS = [
    ("batch_size", {"train_micro_batch_size_per_gpu": 2}, ["--batch_size", "4"],
     "--batch_size 4 conflicts with train_micro_batch_size_per_gpu=2 in ds.json"),
    ("gradient_accumulation", {"gradient_accumulation_steps": 4}, ["--gradient_accumulation", "2"],
     "--gradiant_accumulation 2 conflicts with gradient_accumulation_steps=4 in ds.json"),
    ("lr", {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, ["--lr", "1e-5"],
     "--lr 1e-05 conflicts with optimizer.params.lr=0.0001 in ds.json"),
    ("weight_decay", {"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1}}}, ["--weight_decay", "0"],
     "--weight_decay 0.0 conflicts with optimizer.params.weight_decay=0.1 in ds.json"),
    ("precision-bf16-disabled", {"bf16": {"enabled": False}}, ["--precision", "bf16"],
     "--precision bf16 conflicts with bf16.enabled=False in ds.json"),
    ("precision-fp16-enabled", {"fp16": {"enabled": True}}, ["--precision", "fp32"],
     "--precision fp32 conflicts with fp16.enabled=True in ds.json"),
]


@pytest.mark.parametrize("ds,argv,message", [c[1:] for c in CONFLICTS], ids=[c[0] for c in CONFLICTS])
def test_typed_flag_conflicting_with_json_value(ds, argv, message):
    with pytest.raises(ConfigError) as info:
        resolve(ds, *argv)
    assert str(info.value).startswith(message)


def test_typed_flag_equal_to_json_value_is_fine():
    ds, config = resolve({"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}},
                         "--batch_size", "2", "--precision", "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 2 and config.optim.batch_size == 2


def test_untyped_flags_adopt_json_values():
    ds, config = resolve({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3,
                          "optimizer": {"type": "AdamW", "params": {"lr": 2e-5, "weight_decay": 0}}}, world_size=2)
    assert config.optim.batch_size == 4 and config.optim.gradiant_accumulation == 3
    assert config.optim.lr == 2e-5 and config.optim.weight_decay == 0.0
    assert ds["train_batch_size"] == 4 * 3 * 2


@pytest.mark.parametrize("json_precision,expected", [
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": "auto"}}, "fp16"),
    ({"bf16": {"enabled": True}}, "bf16"),
    ({"bf16": {"enabled": False}}, "fp32"),
    ({"bf16": {"enabled": False}, "fp16": {"enabled": "auto"}}, "fp32"),
    ({"bf16": {"enabled": False}, "fp16": {"enabled": False}}, "fp32"),
], ids=["fp16-on", "fp16-on-bf16-auto", "bf16-on", "bf16-off", "bf16-off-fp16-auto", "both-off"])
def test_untyped_precision_adopts_the_json(json_precision, expected):
    ds, config = resolve(json_precision)
    assert config.optim.precision == expected  # the model is built in what the engine runs
    assert ds["bf16"]["enabled"] is (expected == "bf16") and ds["fp16"]["enabled"] is (expected == "fp16")


def test_train_batch_size_must_match():
    with pytest.raises(ConfigError) as info:
        resolve({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 16},
                world_size=2)
    assert str(info.value) == ("ds.json: train_batch_size=16 conflicts with train_micro_batch_size_per_gpu (2) x "
                               "gradient_accumulation_steps (2) x world size (2) = 8")
    ds, _ = resolve({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 8},
                    world_size=2)
    assert ds["train_batch_size"] == 8


def test_train_batch_size_checked_against_flags_and_world_size():
    with pytest.raises(ConfigError, match=r"train_batch_size=8 conflicts with .* x world size \(1\) = 4"):
        resolve({"train_batch_size": 8}, "--batch_size", "4")


@pytest.mark.parametrize("stage", [4, -1, "3", None], ids=["4", "-1", "string", "null"])
def test_zero_stage_must_be_0_to_3(stage):
    with pytest.raises(ConfigError) as info:
        resolve({"zero_optimization": {"stage": stage}})
    assert str(info.value) == f"ds.json: zero_optimization.stage: must be 0, 1, 2 or 3, got {stage!r}"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_accepted(stage):
    assert resolve({"zero_optimization": {"stage": stage}})[0]["zero_optimization"]["stage"] == stage


def test_bf16_and_fp16_both_enabled():
    with pytest.raises(ConfigError, match=r"^ds.json: bf16.enabled and fp16.enabled are both true$"):
        resolve({"bf16": {"enabled": True}, "fp16": {"enabled": True}})


_EXPECTED = 'expected {} or "auto", got {}'
MISTYPED = [
    ("batch-string", {"train_micro_batch_size_per_gpu": "2"},
     "train_micro_batch_size_per_gpu: " + _EXPECTED.format("int", "'2'")),
    ("batch-float", {"train_micro_batch_size_per_gpu": 2.0},
     "train_micro_batch_size_per_gpu: " + _EXPECTED.format("int", "2.0")),
    ("gas-bool", {"gradient_accumulation_steps": True},
     "gradient_accumulation_steps: " + _EXPECTED.format("int", "True")),
    ("batch-zero", {"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu: must be >= 1, got 0"),
    ("bf16-string", {"bf16": {"enabled": "true"}}, "bf16.enabled: " + _EXPECTED.format("bool", "'true'")),
    ("bf16-not-object", {"bf16": True}, "bf16: must be a JSON object, got True"),
    ("lr-string", {"optimizer": {"params": {"lr": "1e-5"}}},
     "optimizer.params.lr: " + _EXPECTED.format("float", "'1e-5'")),
    ("optimizer-not-object", {"optimizer": "AdamW"}, "optimizer: must be a JSON object, got 'AdamW'"),
    ("zero-not-object", {"zero_optimization": [3]}, "zero_optimization: must be a JSON object, got [3]"),
]


@pytest.mark.parametrize("ds,message", [c[1:] for c in MISTYPED], ids=[c[0] for c in MISTYPED])
def test_mistyped_json_values(ds, message):
    with pytest.raises(ConfigError) as info:
        resolve(ds)
    assert str(info.value) == "ds.json: " + message


def test_integer_lr_in_json_is_a_number():
    _, config = resolve({"optimizer": {"params": {"lr": 1, "weight_decay": 0}}})
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)


# ---------------------------------------------------------------- reading the file
@pytest.mark.parametrize("name", DS_CONFIGS)
def test_shipped_configs_load(name):
    ds = ds_file(name)
    assert isinstance(ds, dict) and ds["zero_optimization"]["stage"] in (2, 3)


def test_missing_ds_config(tmp_path):
    with pytest.raises(ConfigError, match=rf"^--deepspeed {tmp_path / 'nope.json'}: cannot be read"):
        load_ds_config(tmp_path / "nope.json")


def test_ds_config_not_json(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 8,\n  "zero_optimization": {"stage": 3,}}')
    with pytest.raises(ConfigError) as info:
        load_ds_config(path)
    assert str(info.value).startswith(f"{path}: invalid JSON (") and "line 2 column" in str(info.value)


@pytest.mark.parametrize("content,found", [("[1, 2]", "list"), ('"zero3"', "str"), ("null", "NoneType")])
def test_ds_config_top_level_must_be_an_object(tmp_path, content, found):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_ds_config(path)
    assert str(info.value) == f"{path}: the top level must be a JSON object, found {found}"
