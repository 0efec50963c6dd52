"""The DeepSpeed config: from the training config alone, and from an Accelerate launch or DeepSpeed JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trainer.config import ConfigError, TrainConfig, load_config
from trainer.ds_config import deepspeed_config

ACCELERATE_VARIABLES = (
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "ACCELERATE_DEEPSPEED_CONFIG_FILE",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "ACCELERATE_GRADIENT_CLIPPING",
    "ACCELERATE_MIXED_PRECISION",
    "ACCELERATE_CONFIG_DS_FIELDS",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT",
)


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    for name in ACCELERATE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _config(**sections) -> TrainConfig:
    base = {
        "model": {"dtype": "float32"},
        "train": {"micro_batch_size": 4, "lr": 3e-4, "grad_clip": 1.0, "weight_decay": 0.01},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return TrainConfig.model_validate(base)


def _json(tmp_path, body: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(body))
    return str(path)


def test_without_a_launcher_the_training_config_says_everything():
    ds = deepspeed_config(_config(deepspeed={"zero_stage": 3, "offload": True}), 5, processes=2)
    assert ds["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 5)
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["bf16"] == {"enabled": False}
    assert "scheduler" not in ds


def test_accelerate_launch_flags_choose_zero_but_not_the_batch_shape(monkeypatch):
    # What `accelerate launch --use_deepspeed --zero_stage 3 --offload_optimizer_device cpu
    # --gradient_accumulation_steps 1 --gradient_clipping 0.5` puts in the environment.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "0.5")
    ds = deepspeed_config(_config(), 5, processes=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "none"
    assert ds["gradient_clipping"] == 0.5
    # The loop fixes the micro-batches per optimizer step: the launcher's accumulation is not used.
    assert ds["gradient_accumulation_steps"] == 5
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (4, 4 * 5 * 2)
    assert ds["optimizer"]["params"]["lr"] == 3e-4


def test_auto_values_in_a_deepspeed_json_take_the_training_config(tmp_path):
    path = _json(
        tmp_path,
        {
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 2, "overlap_comm": True},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "weight_decay": 0.1}},
            "scheduler": {
                "type": "WarmupLR",
                "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"},
            },
        },
    )
    config = _config(deepspeed={"config_file": path}, train={"warmup_steps": 7, "betas": [0.9, 0.95]})
    ds = deepspeed_config(config, 3, processes=1)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (4, 12)
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (3, 1.0)
    assert ds["bf16"] == {"enabled": False}
    # The file's explicit weight decay wins over the training config's; its autos take ours.
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}
    assert ds["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 3e-4, "warmup_num_steps": 7}


def test_a_json_with_only_zero_settings_gets_our_optimizer_and_an_auto_stage_ours(tmp_path):
    path = _json(tmp_path, {"zero_optimization": {"stage": "auto"}})
    ds = deepspeed_config(_config(deepspeed={"config_file": path, "zero_stage": 1}), 2, processes=1)
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (
            {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8},
            "train_micro_batch_size_per_gpu=8",
        ),
        (
            {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 16},
            "gradient_accumulation_steps=16",
        ),
        ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "fp16.enabled=True"),
        (
            {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}},
            "zero_optimization.reduce_bucket_size",
        ),
        ({"train_batch_size": 4}, "ZeRO optimization config"),
    ],
)
def test_a_deepspeed_json_that_disagrees_with_the_loop_is_refused(tmp_path, body, named):
    config = _config(deepspeed={"config_file": _json(tmp_path, body)})
    with pytest.raises(ConfigError, match=r"deepspeed\.config_file") as error:
        deepspeed_config(config, 3, processes=1)
    assert named in str(error.value)


def test_a_launcher_asking_for_a_precision_the_run_does_not_use_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        deepspeed_config(_config(), 1, processes=1)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert deepspeed_config(_config(), 1, processes=1)["bf16"] == {"enabled": False}


def test_a_missing_deepspeed_json_is_named_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"deepspeed\.config_file.*is not a file"):
        load_config(None, [f"deepspeed.config_file={tmp_path / 'nope.json'}"])


def test_the_shipped_accelerate_zero3_config_leaves_the_batch_shape_and_sizes_to_the_run():
    shipped = Path(__file__).resolve().parents[1] / "configs/accelerate"
    launch = yaml.safe_load((shipped / "deepspeed_zero3.yaml").read_text())
    assert launch["deepspeed_config"]["deepspeed_config_file"] == "configs/accelerate/zero3.json"
    config = _config(deepspeed={"config_file": str(shipped / "zero3.json")})
    ds = deepspeed_config(config, 6, processes=8, hidden_size=512)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 235_929  # "auto": from the width
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 6)
    assert (ds["train_batch_size"], ds["bf16"]["enabled"]) == (4 * 6 * 8, False)


def test_zero3_sizes_follow_the_model_width_where_the_json_does_not_set_them(tmp_path):
    """Accelerate's rule (h², 0.9·h², 10·h), and 0.9·h² live or reused parameters; a JSON's "auto" takes
    them too, a value it sets stays, and below stage 3 the training config adds none."""
    ours = deepspeed_config(_config(deepspeed={"zero_stage": 3}), 1, processes=2, hidden_size=512)
    assert {k: v for k, v in ours["zero_optimization"].items() if k != "stage"} == {
        "reduce_bucket_size": 262_144,
        "stage3_prefetch_bucket_size": 235_929,
        "stage3_param_persistence_threshold": 5_120,
        "stage3_max_live_parameters": 235_929,
        "stage3_max_reuse_distance": 235_929,
    }
    zero = {"stage": 3, "reduce_bucket_size": "auto", "stage3_max_live_parameters": 1000}
    path = _json(tmp_path, {"zero_optimization": zero})
    theirs = deepspeed_config(_config(deepspeed={"config_file": path}), 1, processes=1, hidden_size=512)
    assert theirs["zero_optimization"]["reduce_bucket_size"] == 262_144
    assert theirs["zero_optimization"]["stage3_max_live_parameters"] == 1000
    below = deepspeed_config(_config(deepspeed={"zero_stage": 2}), 1, processes=1, hidden_size=512)
    assert below["zero_optimization"] == {"stage": 2}
