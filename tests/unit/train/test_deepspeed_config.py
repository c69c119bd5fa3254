"""Tests for mmdc/train/deepspeed_config.py: batch arithmetic, precision blocks, ZeRO stages."""

from __future__ import annotations

import json

import pytest

from mmdc.config import TrainConfig, grad_accumulation
from mmdc.train.deepspeed_config import deepspeed_config


def test_batch_fields_follow_train_config():
    cfg = TrainConfig(global_batch_size=16, micro_batch_size=2, num_workers=2, max_grad_norm=0.5)
    accum = grad_accumulation(cfg)
    ds = deepspeed_config(cfg, accum)
    assert accum == 4
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert "train_batch_size" not in ds  # derived by DeepSpeed from world size
    # DeepSpeed's own check: micro x accum x world == train batch
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * cfg.num_workers == 16


def test_no_optimizer_or_scheduler_blocks():
    ds = deepspeed_config(TrainConfig(), 1)
    assert "optimizer" not in ds and "scheduler" not in ds


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage(stage):
    ds = deepspeed_config(TrainConfig(zero_stage=stage), 1)
    assert ds["zero_optimization"]["stage"] == stage
    gather = ds["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False)
    assert gather is (stage == 3)


def test_precision_blocks():
    fp32 = deepspeed_config(TrainConfig(precision="fp32"), 1)
    assert "fp16" not in fp32 and "bf16" not in fp32
    fp16 = deepspeed_config(TrainConfig(precision="fp16"), 1)
    assert fp16["fp16"]["enabled"] is True and fp16["fp16"]["loss_scale"] == 0  # dynamic scaling
    assert "bf16" not in fp16
    bf16 = deepspeed_config(TrainConfig(precision="bf16"), 1)
    assert bf16["bf16"] == {"enabled": True} and "fp16" not in bf16


def test_overlap_comm_only_on_gpu():
    assert deepspeed_config(TrainConfig(gpus_per_worker=0), 1)["zero_optimization"]["overlap_comm"] is False
    assert deepspeed_config(TrainConfig(gpus_per_worker=1), 1)["zero_optimization"]["overlap_comm"] is True


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="grad_accum"):
        deepspeed_config(TrainConfig(), 0)
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(TrainConfig(zero_stage=4), 1)


def test_config_is_json_serialisable():
    json.dumps(deepspeed_config(TrainConfig(precision="fp16", zero_stage=3), 2))


def test_deepspeed_accepts_the_config():
    """DeepSpeed's own config parser takes the dict (world size 1, no process group needed)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = TrainConfig(micro_batch_size=2, global_batch_size=4, num_workers=1, zero_stage=2)
    parsed = DeepSpeedConfig(deepspeed_config(cfg, grad_accumulation(cfg)), mpu=None)
    assert parsed.train_batch_size == 4
    assert parsed.zero_optimization_stage == 2


@pytest.mark.parametrize("stage", [2, 3])
def test_offload_optimizer_puts_the_optimizer_states_on_the_cpu(stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = TrainConfig(micro_batch_size=2, global_batch_size=4, num_workers=1, zero_stage=stage, offload_optimizer=True)
    ds = deepspeed_config(cfg, grad_accumulation(cfg))
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["zero_force_ds_cpu_optimizer"] is False  # the loop's torch AdamW is the client optimizer
    parsed = DeepSpeedConfig(ds, mpu=None)
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert "offload_optimizer" not in deepspeed_config(TrainConfig(zero_stage=stage), 1)["zero_optimization"]


@pytest.mark.parametrize("stage", [0, 1])
def test_offload_optimizer_below_zero_2_is_refused(stage):
    with pytest.raises(ValueError, match="offload_optimizer"):
        deepspeed_config(TrainConfig(zero_stage=stage, offload_optimizer=True), 1)


@pytest.mark.parametrize("overrides", [["tune.zero_stage=1"], ["tune.zero_stage=0"], ["tune.strategy=ddp"]])
def test_config_refuses_offload_without_zero_2_or_3(overrides):
    from mmdc.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="tune.offload_optimizer"):
        load_config(None, ["tune.offload_optimizer=true", *overrides])
    load_config(None, ["tune.offload_optimizer=true", "tune.zero_stage=3"])  # the supported combination
