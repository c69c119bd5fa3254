"""Tests for mmdc/sizing/architectures.py: parameter counts of the real architectures, built on the meta device.

The exact counts pin what transformers builds from the published config values; the published
figures (model cards, papers) are rounded, so those are compared within 0.5 %.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from mmdc.sizing.architectures import (
    PUBLISHED_CONFIGS,
    PUBLISHED_PARAMS,
    TINY_STUDENT,
    TINY_TEACHER,
    ModelNotFound,
    assemble,
    measure,
    resolve,
    tiny_config,
)

EXACT = {
    "openai/clip-vit-large-patch14": 303_179_776,  # vision tower, 224 px
    "openai/clip-vit-large-patch14-336": 303_507_456,  # 336 px: 320 more position embeddings
    "huggyllama/llama-7b": 6_738_415_616,
    "lmsys/vicuna-7b-v1.1": 6_738_415_616,
    "llava-hf/llava-1.5-7b-hf": 7_063_427_072,
    "llava-hf/llava-1.5-13b-hf": 13_351_494_656,
}
PUBLISHED_TOLERANCE = 0.005


@pytest.mark.parametrize("model_id", sorted(EXACT))
def test_counts_from_published_configs(model_id):
    arch = resolve(model_id)
    assert arch.total == EXACT[model_id]
    assert arch.source.startswith("published config.json values")


@pytest.mark.parametrize("model_id", sorted(PUBLISHED_PARAMS))
def test_counts_match_the_published_figures(model_id):
    published, _ = PUBLISHED_PARAMS[model_id]
    assert resolve(model_id).total == pytest.approx(published, rel=PUBLISHED_TOLERANCE)


def test_a_13b_llava_builds_fast_on_the_meta_device():
    tree = {**PUBLISHED_CONFIGS["llava-hf/llava-1.5-13b-hf"], "image_seq_length": 575}  # uncached variant
    start = time.perf_counter()
    arch = measure("x", "test", tree)
    assert time.perf_counter() - start < 5
    assert arch.total == EXACT["llava-hf/llava-1.5-13b-hf"]


def test_llava_13b_parts_and_dimensions():
    arch = resolve("llava-hf/llava-1.5-13b-hf")
    assert arch.vision == EXACT["openai/clip-vit-large-patch14-336"]
    assert arch.projector == (1024 * 5120 + 5120) + (5120 * 5120 + 5120)  # mlp2x_gelu
    assert arch.vision + arch.projector + arch.language == arch.total
    assert arch.image_tokens == 576 and arch.projector_act == "gelu"
    assert arch.text.kv_bytes_per_token * 2 == 819_200  # fp16: 2 x 40 layers x 5120 x 2 bytes
    assert arch.largest_layer == 32064 * 5120  # the embedding (DeepSpeed's ZeRO-3 estimator input)
    assert arch.checkpoint_dtype == "float16"


def test_assembled_student_as_assembly_builds_it():
    arch = assemble("openai/clip-vit-large-patch14", "lmsys/vicuna-7b-v1.1", "linear")
    vocab = 32001  # + <image>
    linear_1, linear_2 = 1024 * 4096 + 4096, 4096 * 4096 + 4096
    assert arch.vision == EXACT["openai/clip-vit-large-patch14"]
    assert arch.projector == linear_1 + linear_2
    assert arch.language == EXACT["lmsys/vicuna-7b-v1.1"] + 2 * 4096  # one more embedding and LM-head row
    assert arch.total == arch.vision + arch.projector + arch.language
    assert arch.text.vocab == vocab and arch.image_tokens == 256 and arch.text.max_positions == 2048
    assert arch.trainable("align") == linear_1  # W only: linear_2 is the fixed identity
    assert arch.trainable("tune") == linear_1 + arch.language
    assert arch.checkpoint_dtype == "float32"  # assemble_llava's default
    assert "lmsys/vicuna-7b-v1.1" in arch.source and "published" in arch.source


def test_lora_counts():
    arch = assemble("openai/clip-vit-large-patch14", "lmsys/vicuna-7b-v1.1", "linear")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert arch.lora_params(targets, 16) == 16 * (4096 + 4096) * 4 * 32
    # peft trains the adapters and (modules_to_save) the whole projector
    assert arch.trainable("tune", targets, 16) == arch.lora_params(targets, 16) + arch.projector
    mlp = arch.lora_params(("gate_proj",), 8)
    assert mlp == 8 * (4096 + 11008) * 32


def _tiny_module():
    try:
        from mmdc.world import tiny
    except ImportError:  # before the floors refactor
        from mmdc.train import tiny
    return tiny


def test_tiny_specs_mirror_the_world_builder():
    tiny = _tiny_module()
    assert dataclasses.asdict(tiny.TEACHER_SPEC) == TINY_TEACHER
    assert dataclasses.asdict(tiny.STUDENT_SPEC) == TINY_STUDENT


def test_tiny_counts_equal_a_built_tiny_model(tmp_path):
    from transformers import LlavaForConditionalGeneration

    tiny = _tiny_module()
    tokenizer = tiny.train_tokenizer(["a red circle", "two blue squares"], vocab_size=300)
    folder = tiny.build_tiny_llava(tmp_path / "t", tiny.TEACHER_SPEC, tokenizer, seed=0)
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    built = sum(p.numel() for p in model.parameters())
    assert measure("tiny:teacher", "test", tiny_config(TINY_TEACHER, vocab_size=len(tokenizer))).total == built
    assert resolve(folder).total == built  # the saved config.json read as a local folder
    assert resolve(folder).source.startswith("local config.json")
    assert resolve("tiny:teacher").total >= built  # the plan's vocab (the BPE target) is an upper bound


def test_local_and_model_config_sources(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PUBLISHED_CONFIGS["llava-hf/llava-1.5-7b-hf"]))
    by_flag = resolve("my-org/unknown-llava", {"my-org/unknown-llava": str(path)})
    assert by_flag.total == EXACT["llava-hf/llava-1.5-7b-hf"]
    assert by_flag.source == f"--model-config {path}"
    assert resolve(str(tmp_path)).source == f"local config.json: {path}"


def test_unknown_models_say_how_to_supply_a_config(tmp_path):
    with pytest.raises(ModelNotFound, match="--model-config my-org/unknown=PATH"):
        resolve("my-org/unknown")
    with pytest.raises(ModelNotFound, match="unknown tiny model"):
        resolve("tiny:huge")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="no model_type"):
        resolve("x", {"x": str(tmp_path)})
