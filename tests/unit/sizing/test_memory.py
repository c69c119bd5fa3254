"""Tests for mmdc/sizing/memory.py: DeepSpeed's own estimates, activations, KV caches, vLLM's budget."""

from __future__ import annotations

import pytest

from mmdc.sizing import memory
from mmdc.sizing.architectures import assemble, resolve
from mmdc.sizing.gpus import GIB, get_gpu

VICUNA_7B = 6_738_415_616


@pytest.fixture(scope="module")
def student():
    return assemble("openai/clip-vit-large-patch14", "lmsys/vicuna-7b-v1.1", "linear")


@pytest.fixture(scope="module")
def teacher():
    return resolve("llava-hf/llava-1.5-13b-hf")


def test_deepspeed_estimates_of_issue_25():
    """6.74B trainable on 6 GPUs: ZeRO-3 19.3 GiB per GPU without offload, ZeRO-2 31.4 GiB."""
    largest = 32000 * 4096
    zero3, _, how3 = memory.model_states(VICUNA_7B, largest, "deepspeed", 3, 6, 8, False)
    zero2, _, how2 = memory.model_states(VICUNA_7B, largest, "deepspeed", 2, 6, 8, False)
    assert zero3 / GIB == pytest.approx(19.3, abs=0.05)
    assert zero2 / GIB == pytest.approx(31.4, abs=0.05)
    assert "estimate_zero3_model_states_mem_needs" in how3 and "estimate_zero2_model_states_mem_needs" in how2


def test_deepspeed_estimator_is_called_with_our_arguments():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        10**9, 10**8, num_gpus_per_node=4, num_nodes=2, cpu_offload=True, cpu_offload_params=False, zero_init=True
    )
    assert memory.model_states(10**9, 10**8, "deepspeed", 3, 8, 4, True)[:2] == (gpu, cpu)


def test_offload_and_lora_shrink_the_model_states(student):
    args = dict(
        strategy="deepspeed",
        zero_stage=3,
        precision="fp16",
        workers=6,
        micro_batch=4,
        max_length=2048,
        checkpointing=True,
    )
    full = memory.trainer(student, "tune", **args)
    offload = memory.trainer(student, "tune", offload_optimizer=True, **args)
    lora = memory.trainer(student, "tune", lora_targets=("q_proj", "v_proj"), lora_r=16, **args)
    assert offload.steady.get("model states") < full.steady.get("model states") / 5
    assert offload.host_per_node >= 16 * student.trainable("tune")  # fp32 master weights + Adam moments in RAM
    assert lora.steady.get("model states") < 2 * GIB
    # ZeRO-3 partitions the frozen weights too (16-bit): the vision tower over 6 GPUs
    frozen = student.vision + student.projector - student.trainable("align")  # vision tower + linear_2
    assert full.steady.get("frozen weights") == frozen * 2 // 6


def test_zero2_keeps_frozen_weights_whole_and_align_trains_the_projector_only(student):
    align = memory.trainer(
        student,
        "align",
        strategy="deepspeed",
        zero_stage=2,
        precision="fp16",
        workers=6,
        micro_batch=8,
        max_length=2048,
        checkpointing=True,
    )
    assert align.steady.get("frozen weights") == (student.total - student.trainable("align")) * 2
    assert align.steady.get("model states") < 0.1 * GIB
    assert align.save == 0  # only ZeRO-3 gathers on save


def test_zero3_loads_partitioned_and_saves_one_module_at_a_time(student):
    """The fixed loader and save (issue 25): zero.Init partitions as it loads, the save consolidates one module
    at a time onto rank 0's host RAM; neither holds the whole model on a GPU."""
    tm = memory.trainer(
        student,
        "tune",
        strategy="deepspeed",
        zero_stage=3,
        precision="fp16",
        workers=6,
        micro_batch=4,
        max_length=2048,
        checkpointing=True,
    )
    assert tm.load == 2 * student.total // 6 + 2 * student.largest_layer  # this rank's partition + one module
    steady_without_batch = tm.steady.total - tm.steady.get("activations") - tm.steady.get("logits + loss")
    assert tm.save == steady_without_batch + 2 * student.largest_layer
    assert tm.save < tm.steady.total and tm.peak == tm.steady.total
    assert tm.save_host == 2 * student.total  # rank 0's consolidated 16-bit copy
    assert tm.host_per_node >= tm.save_host and tm.load_dtype == "partitioned by zero.Init"


def test_zero2_and_ddp_load_in_their_training_dtype(student):
    args = dict(precision="fp16", workers=6, micro_batch=1, max_length=512, checkpointing=True)
    zero2 = memory.trainer(student, "align", strategy="deepspeed", zero_stage=2, **args)
    ddp = memory.trainer(student, "align", strategy="ddp", zero_stage=0, **args)
    assert zero2.load == 2 * student.total and ddp.load == 4 * student.total  # DDP's autocast needs fp32 weights
    assert zero2.save == 0 and zero2.host_per_node == 6 * 2 * student.total  # six workers' 16-bit loads


def test_assembly_holds_the_weights_in_its_dtype_and_the_embedding_resize(student):
    half, full = memory.assembly(student, "float16"), memory.assembly(student, "float32")
    assert half.get("weights") == 2 * student.total and full.get("weights") == 4 * student.total
    assert half.get("embedding resize") == 32001 * 4096 * (2 + 4) + 4 * 4096**2
    assert half.total < 15.5 * GIB < full.total  # 7.06B: ~14.4 GiB in fp16, ~27 GiB in fp32


def test_activations_with_and_without_checkpointing(student):
    t = student.text
    full = memory.training_activations(student, 4, 2048, "fp16", checkpointing=False)
    ckpt = memory.training_activations(student, 4, 2048, "fp16", checkpointing=True)
    assert full == t.layers * 4 * 2048 * (8 * t.hidden + 4 * t.intermediate) * 2
    assert ckpt < full / 5
    assert memory.training_activations(student, 4, 2048, "fp32", True) == 2 * ckpt
    assert memory.logits_bytes(student, 4, 2048, "fp16") == 4 * 2048 * 32001 * 14


def test_ddp_holds_fp32_weights_and_autocast_copies(student):
    tm = memory.trainer(
        student,
        "align",
        strategy="ddp",
        zero_stage=0,
        precision="fp16",
        workers=2,
        micro_batch=1,
        max_length=512,
        checkpointing=True,
    )
    assert tm.steady.get("frozen weights") == (student.total - student.trainable("align")) * 4
    assert tm.steady.get("autocast copies") == 2 * student.total
    assert tm.steady.get("DeepSpeed buffers") == 0


def test_hf_engine_memory(teacher):
    mem = memory.hf_engine(teacher, "float16", batch=2, prompt_tokens=800, new_tokens=512)
    assert mem.get("weights") == teacher.total * 2
    assert mem.get("KV cache") == 2 * (800 + 512) * 819_200
    eager = memory.hf_engine(teacher, "float16", batch=2, prompt_tokens=800, new_tokens=512, attention="eager")
    assert eager.get("attention scores") > 0 and mem.get("attention scores") == 0
    scored = memory.hf_engine(teacher, "float16", batch=2, prompt_tokens=800, new_tokens=512, score=True)
    assert scored.get("logits") == 2 * 1312 * 32064 * (2 + 8)
    assert "weights" in mem.describe() and mem.describe().endswith("GiB")


def test_vllm_engine_budget_and_kv_cache(teacher):
    v100 = get_gpu("v100-32gb")
    tp2 = memory.vllm_engine(teacher, "float16", 2, v100.memory_bytes, 0.9, 32)
    assert tp2.budget == int(0.9 * v100.memory_bytes)
    assert tp2.memory.total == tp2.budget  # vLLM fills what is left with KV cache
    assert tp2.kv_tokens == tp2.memory.get("KV cache") // (819_200 // 2)
    tp1 = memory.vllm_engine(teacher, "float16", 1, get_gpu("v100-16gb").memory_bytes, 0.9, 32)
    assert tp1.kv_tokens == 0  # 24.9 GiB of weights on a 16 GB card
