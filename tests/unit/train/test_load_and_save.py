"""What a trainer worker holds while it loads the student and while it saves it (issue 25, defects b and c).

On one process (a world-size-1 gloo group, DeepSpeed on its CPU accelerator), with a tiny LLaVA: the dtype each
strategy loads in, ZeRO-3 building the model partitioned (no whole copy), and the ZeRO-3 save consolidating one
module at a time into an HF checkpoint that ``from_pretrained`` loads, with and without LoRA.
"""

from __future__ import annotations

import pytest

from mmdc.config import LoraConfig, TrainConfig
from mmdc.sizing import memory
from mmdc.train.worker import load_dtype, load_student, optimizer_and_schedule
from mmdc.world.tiny import TinySpec, build_tiny_llava, train_tokenizer

SPEC = TinySpec(
    image_size=32,
    patch_size=16,
    vision_hidden=32,
    vision_layers=2,
    vision_heads=2,
    text_hidden=64,
    text_layers=2,
    text_heads=2,
    text_intermediate=128,
    vocab_size=300,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("student")
    tokenizer = train_tokenizer(["what color is the square?", "the square is red."], vocab_size=SPEC.vocab_size)
    return build_tiny_llava(root / "ckpt", SPEC, tokenizer, seed=0)


@pytest.fixture(scope="module")
def one_rank():
    """One world-size-1 gloo group for the module, with the variables Ray Train sets for a worker (zero.Init reads
    LOCAL_RANK). Module-wide because DeepSpeed caches a clone of the world group for the life of the process."""
    import os
    import socket

    import torch.distributed as dist

    names = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    import deepspeed.utils.groups

    deepspeed.utils.groups._WORLD_GROUP = None  # the clone belonged to the group just destroyed
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _cfg(**kw) -> TrainConfig:
    base = dict(strategy="deepspeed", zero_stage=2, num_workers=1, micro_batch_size=1, global_batch_size=1)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "strategy, zero_stage, precision, dtype",
    [
        ("ddp", 0, "fp16", "float32"),  # autocast + GradScaler: fp32 parameters are the training state
        ("ddp", 0, "fp32", "float32"),
        ("deepspeed", 2, "fp32", "float32"),  # the CPU default: unchanged
        ("deepspeed", 2, "fp16", "float16"),  # DeepSpeed keeps the fp32 master copy itself
        ("deepspeed", 3, "bf16", "bfloat16"),
        ("deepspeed", 0, "fp16", "float16"),
    ],
)
def test_each_strategy_loads_in_the_dtype_it_trains_and_the_plan_agrees(strategy, zero_stage, precision, dtype):
    cfg = _cfg(strategy=strategy, zero_stage=zero_stage, precision=precision)
    assert load_dtype(cfg) == dtype
    expected = 0 if (strategy, zero_stage) == ("deepspeed", 3) else memory.dtype_bytes(dtype)
    assert memory.load_bytes_per_param(strategy, precision, zero_stage) == expected


def test_a_deepspeed_fp16_worker_never_materialises_fp32_weights(checkpoint):
    """Defect b: the loader used to build every worker's student in fp32 (4 bytes per parameter) before DeepSpeed
    cast it; a 7B student is 26 GiB that way, on a 31 GiB V100."""
    import torch

    model, _ = load_student(checkpoint, "tune", _cfg(precision="fp16"))
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    model, _ = load_student(checkpoint, "tune", _cfg(precision="fp32"))  # the CPU default stays fp32
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_zero3_builds_the_student_partitioned(checkpoint, one_rank):
    """Under ZeRO-3 no parameter is whole after the load (zero.Init partitions as it builds), the weights are the
    checkpoint's, and nothing after the load still sees transformers' ZeRO-3 switch."""
    import deepspeed
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.integrations import is_deepspeed_zero3_enabled

    model, _ = load_student(checkpoint, "tune", _cfg(zero_stage=3))
    params = list(model.parameters())
    assert params and all(hasattr(p, "ds_id") for p in params)
    assert sum(p.numel() for p in params) == 0  # only ds_tensor partitions remain
    assert not is_deepspeed_zero3_enabled()
    reference = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    head = model.lm_head.weight
    with deepspeed.zero.GatheredParameters([head]):
        assert torch.equal(head.data, reference.lm_head.weight)


def _record_gathers(monkeypatch) -> list[int]:
    """Parameters gathered at once by each ``GatheredParameters`` entered from here on."""
    import deepspeed

    sizes: list[int] = []
    original = deepspeed.zero.GatheredParameters

    def recording(params, *args, **kwargs):
        items = [params] if not isinstance(params, (list, tuple)) else list(params)
        sizes.append(sum(int(getattr(p, "ds_numel", p.numel())) for p in items if p is not None))
        return original(params, *args, **kwargs)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recording)
    return sizes


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
def test_zero3_save_consolidates_one_module_at_a_time_into_an_hf_checkpoint(
    lora, checkpoint, one_rank, monkeypatch, tmp_path
):
    """Defect c: the save gathered every parameter on every rank at once (a whole 16-bit 7B beside each rank's
    partition). Now the largest gather is one module's own parameters, and the checkpoint still loads."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmdc.train.strategies import DeepSpeedStrategy

    lora_cfg = LoraConfig(enabled=lora, r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"], merge=True)
    cfg = _cfg(zero_stage=3, lr=1e-2, warmup_ratio=0.0, lr_schedule="constant", lora=lora_cfg)
    model, processor = load_student(checkpoint, "tune", cfg)
    optimizer, scheduler = optimizer_and_schedule(model, cfg, total_steps=1)
    strategy = DeepSpeedStrategy(model, optimizer, scheduler, cfg, accum=1, device=torch.device("cpu"))
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    strategy.micro_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, 1.0)
    assert strategy.step()

    reference = LlavaForConditionalGeneration.from_pretrained(checkpoint)
    total = sum(p.numel() for p in reference.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in reference.modules())
    gathered = _record_gathers(monkeypatch)
    strategy.save(str(tmp_path / "out"), processor, lora_cfg, rank=0, summary={"steps": 1})
    assert gathered and max(gathered) <= largest + (4 * 64 if lora else 0) < total / 4

    saved = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    before, after = reference.state_dict(), saved.state_dict()
    assert before.keys() == after.keys()  # whole tensors, merged: no lora_A / modules_to_save keys
    assert all(after[k].shape == before[k].shape for k in before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if lora:  # the adapters were merged into the LM's q / v projections, nothing else trained (no image here)
        assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    else:
        assert "lm_head.weight" in changed and not {k for k in changed if "vision_tower" in k}
    assert AutoProcessor.from_pretrained(tmp_path / "out").tokenizer.image_token == "<image>"
    assert (tmp_path / "out" / "model.safetensors").exists()
