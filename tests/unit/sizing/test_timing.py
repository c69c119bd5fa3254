"""Tests for mmdc/sizing/timing.py: pool sizes per iteration, throughput arithmetic, constants kept in step."""

from __future__ import annotations

import pytest

from mmdc.config import load_config
from mmdc.sizing import timing
from mmdc.sizing.architectures import assemble, resolve
from mmdc.sizing.gpus import get_gpu


def test_world_workload_follows_refresh():
    cfg = load_config(None, ["run.iterations=3", "data.world.num_images=100", "data.world.questions_per_image=3"])
    w = timing.workload(cfg)
    assert w.instructions == 300 and w.source == "the synthetic world's size"
    assert w.teach[0] == w.tune[0] == w.assess[0] == 300
    hard = round(300 * timing.HARD_FRACTION)
    accepted = round(hard * timing.ACCEPTED_FRACTION)
    assert w.augment[0] == hard
    assert w.teach[1] == accepted  # only new questions reach the teacher; easy ones are cached
    assert w.tune[1] == 2 * accepted  # refresh: accepted + as many easy
    assert w.assess[1] == 300 + accepted  # the cache pool grows by the accepted questions


def test_replace_random_rows_and_limits():
    cfg = load_config(None, ["calibration.pool_update=replace", "calibration.selection=random", "eval.limit=5"])
    w = timing.workload(cfg, rows=1000, captions=50)
    assert (w.instructions, w.source, w.captions) == (1000, "--rows", 50)
    assert w.tune[1] == 1000 + round(round(1000 * cfg.calibration.random_fraction) * timing.ACCEPTED_FRACTION)
    assert w.assess == (0,) * cfg.run.iterations  # plain distillation assesses nothing
    assert all(n <= 5 for n in w.eval_items.values())


def test_paper_scale_defaults():
    cfg = load_config(None, ["data.source=llava", "data.instructions=x.json", "eval.enabled=false"])
    w = timing.workload(cfg)
    assert w.instructions == timing.PAPER_INSTRUCTIONS and w.captions == timing.LLAVA_PRETRAIN_PAIRS
    assert (
        timing.workload(
            load_config(
                None,
                ["data.source=llava", "data.instructions=x.json", "eval.enabled=false", "data.max_instructions=5000"],
            )
        ).instructions
        == 5000
    )


def test_decode_is_memory_bound_and_vllm_is_faster():
    teacher = resolve("llava-hf/llava-1.5-13b-hf")
    a100, h100 = get_gpu("a100-80gb"), get_gpu("h100-80gb")
    hf = timing.generation_rate(teacher, a100, "hf", 2, 1, 8, 700, 160, 512)
    vllm = timing.generation_rate(teacher, a100, "vllm", 2, 1, 8, 700, 160, 512)
    fast = timing.generation_rate(teacher, h100, "vllm", 2, 1, 8, 700, 160, 512)
    assert vllm.rows_per_s > hf.rows_per_s and fast.rows_per_s > vllm.rows_per_s
    one = timing.generation_rate(teacher, a100, "vllm", 2, 1, 1, 700, 160, 512)
    # one sequence: a step reads the fp16 weights once at the stated share of the bandwidth
    step = (teacher.total * 2 + (700 + 80) * 819_200) / (a100.bandwidth_gbs * 1e9 * 0.6)
    assert one.tokens_per_s == pytest.approx(160 / (160 * step + one_prefill(teacher, a100)), rel=1e-9)


def one_prefill(arch, gpu):
    flops = 2 * (arch.total - arch.vision) * 700 + 2 * arch.vision * (arch.image_tokens + 1)
    return flops / (gpu.tflops_16 * 1e12 * timing.PREFILL_MFU["vllm"])


def test_training_seconds_is_six_n_t():
    student = assemble("openai/clip-vit-large-patch14", "lmsys/vicuna-7b-v1.1", "linear")
    v100 = get_gpu("v100-32gb")
    args = dict(
        workers=6,
        strategy="deepspeed",
        zero_stage=2,
        precision="fp16",
        lora=False,
        trainable=1,
        global_batch=96,
        offload_optimizer=False,
    )
    plain = timing.training_seconds(student, v100, "tune", 1000, 800, checkpointing=False, **args)
    lm = student.total - student.vision
    flops = 1000 * (6 * lm * 800 + 2 * student.vision * 257)
    assert plain == pytest.approx(flops / (6 * 125e12 * timing.TRAIN_MFU[2]))
    ckpt = timing.training_seconds(student, v100, "tune", 1000, 800, checkpointing=True, **args)
    assert ckpt == pytest.approx(plain * 8 / 6, rel=0.01)  # one more forward
    frozen = timing.training_seconds(student, v100, "align", 1000, 800, checkpointing=False, **args)
    assert frozen == pytest.approx(plain * 4 / 6, rel=0.01)  # no weight gradients in the LM


def test_constants_match_the_code_they_describe():
    from mmdc.eval import harness

    assert timing.EVAL_MAX_NEW_TOKENS == harness.MAX_NEW_TOKENS
    assert timing.JUDGE_MAX_NEW_TOKENS == harness.JUDGE_MAX_NEW_TOKENS
    assert set(timing.EVAL_REPLY_TOKENS) == set(harness.MAX_NEW_TOKENS)


def test_role_prompt_tokens_match_table_6():
    try:
        from mmdc import roles
    except ImportError:  # before the floors refactor
        from mmdc.actors import roles
    texts = {
        "teacher": roles.TEACHER_SYSTEM + roles.TEACHER_USER,
        "referee": roles.REFEREE_SYSTEM + roles.REFEREE_USER,
        "augmentor": roles.AUGMENTOR_SYSTEM + roles.AUGMENTOR_USER,
    }
    for role, text in texts.items():
        words = len(text.split())
        assert 1.2 * words <= timing.ROLE_PROMPT_TOKENS[role] <= 1.7 * words, role
