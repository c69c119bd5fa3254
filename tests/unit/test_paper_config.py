"""configs/paper.yaml: parses, fits 6 x V100, has consistent model dimensions and the paper's hyperparameters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mmdc.actors.resources import check_fits, phase_needs
from mmdc.config import grad_accumulation, load_config
from mmdc.train.assembly import check_llava_dims
from mmdc.train.deepspeed_config import deepspeed_config

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper.yaml"

# config.json values of the real models, written out so that no test downloads anything.
CLIP_VIT_L14 = {"hidden_size": 1024, "image_size": 224, "patch_size": 14, "num_hidden_layers": 24}  # openai/clip-vit-large-patch14
VICUNA_7B = {"hidden_size": 4096, "max_position_embeddings": 2048, "num_hidden_layers": 32, "vocab_size": 32000}  # lmsys/vicuna-7b-v1.1
MODEL_CONFIGS = {"openai/clip-vit-large-patch14": CLIP_VIT_L14, "lmsys/vicuna-7b-v1.1": VICUNA_7B}

# A described cluster: a CPU head (8 CPUs, no GPU) + 6 V100s on GPU nodes with 8 CPUs per GPU.
SIX_V100 = {"CPU": 8 + 6 * 8, "GPU": 6}


@pytest.fixture(scope="module")
def cfg():
    return load_config(PAPER)


def test_parses_with_the_strict_loader(cfg):
    assert cfg.data.source == "llava"
    assert cfg.models.teacher == "llava-hf/llava-1.5-13b-hf"
    assert cfg.models.student_init == "assemble"
    assert cfg.models.vision_tower == "openai/clip-vit-large-patch14"
    assert cfg.models.language_model == "lmsys/vicuna-7b-v1.1"
    assert cfg.models.projector == "linear"


def test_every_key_line_carries_a_comment():
    for n, line in enumerate(PAPER.read_text().splitlines(), 1):
        if re.match(r"^\s*[A-Za-z_][\w]*\s*:", line):
            assert "#" in line, f"configs/paper.yaml line {n} has no comment: {line!r}"


def test_paths_are_on_shared_storage(cfg):
    for key in ("instructions", "image_folder", "captions"):
        assert getattr(cfg.data, key).startswith("/mnt/shared/"), key
    assert cfg.run.output_dir.startswith("/mnt/shared/")  # every node must see the run directory


def test_fits_six_v100_and_uses_them_all_at_the_peak(cfg):
    assert check_fits(cfg, SIX_V100) == []
    needs = phase_needs(cfg)
    assert needs["assess"]["GPU"] == 6  # teacher + student engines together
    assert needs["tune"]["GPU"] == 6 and needs["align"]["GPU"] == 6
    assert needs["teach"]["GPU"] == needs["augment"]["GPU"] == 4


def test_five_gpus_are_refused_naming_the_phases(cfg):
    problems = check_fits(cfg, {"CPU": 64, "GPU": 5})
    assert any("'assess' needs 6 GPU" in p for p in problems)
    assert any("'tune' needs 6 GPU" in p for p in problems)


def test_student_dimensions_are_consistent(cfg):
    vision = MODEL_CONFIGS[cfg.models.vision_tower]
    text = MODEL_CONFIGS[cfg.models.language_model]
    dims = check_llava_dims(vision, text, image_size=224, patch_size=14)
    assert dims["image_seq_length"] == 256  # 16 x 16 patches, CLS dropped
    assert (dims["projector_in"], dims["projector_out"]) == (1024, 4096)  # the paper's W
    # a training sample (image tokens included) fits Vicuna's positions and leaves room for text
    assert dims["image_seq_length"] < cfg.tune.max_length <= VICUNA_7B["max_position_embeddings"]
    assert cfg.align.max_length <= VICUNA_7B["max_position_embeddings"]


def test_hyperparameters_are_the_papers(cfg):
    # section 4.1.3: AdamW, batch 16, warmup 0.03, lr 2e-3 / 2e-5, temperature 0.5 for T, R and G
    assert cfg.align.lr == pytest.approx(2e-3)
    assert cfg.tune.lr == pytest.approx(2e-5)
    for stage in (cfg.align, cfg.tune):
        assert stage.warmup_ratio == pytest.approx(0.03)
        assert stage.num_workers * stage.gpus_per_worker == 6  # 6 V100
        # batch 16 per GPU (see the comment in paper.yaml): micro batch x accumulation
        assert stage.micro_batch_size * grad_accumulation(stage) == 16
        assert stage.global_batch_size == 16 * stage.num_workers
        assert stage.precision == "fp16"  # V100: no bf16
        assert stage.strategy == "deepspeed"
    for role in ("teacher", "referee", "augmentor"):
        assert getattr(cfg.roles, role).temperature == pytest.approx(0.5)
    assert cfg.calibration.tau == pytest.approx(0.33)
    assert cfg.calibration.pool_update == "refresh"
    assert cfg.calibration.rouge_l_threshold == pytest.approx(0.7)
    assert cfg.run.iterations == 3
    assert not cfg.tune.lora.enabled  # full fine-tuning


def test_deepspeed_config_is_zero_fp16(cfg):
    ds = deepspeed_config(cfg.tune, grad_accumulation(cfg.tune))
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["fp16"]["enabled"] and "bf16" not in ds
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] == 16


def test_engines_are_fp16_teacher_on_vllm_student_on_hf(cfg):
    teacher, student = cfg.engines["teacher"], cfg.engines["student"]
    assert teacher.dtype == student.dtype == "float16"  # V100: no bf16
    assert teacher.backend == "vllm" and teacher.request_mode == "row"  # continuous batching wants rows
    assert teacher.num_gpus == teacher.tensor_parallel_size == 2
    assert teacher.accelerator_type == "V100"
    assert student.backend == "hf" and student.num_gpus == 1  # the linear-projector student is not vLLM's LLaVA


def test_the_teacher_engine_builds_a_vllm_config_without_vllm(cfg):
    from mmdc.actors.backends.vllm import vllm_llm_config

    c = vllm_llm_config(cfg.engines["teacher"], cfg.models.teacher)
    assert c["engine_kwargs"]["tensor_parallel_size"] == 2 and c["engine_kwargs"]["dtype"] == "float16"
    assert c["model_loading_config"]["model_source"] == "llava-hf/llava-1.5-13b-hf"
    assert c["deployment_config"]["num_replicas"] == 2 and c["accelerator_type"] == "V100"


def test_yaml_has_no_duplicate_keys():
    # PyYAML keeps the last of two equal keys silently; a duplicated key would hide a setting.
    class Strict(yaml.SafeLoader):
        pass

    def construct(loader, node, deep=False):
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
        dup = {k for k in keys if keys.count(k) > 1}
        assert not dup, f"duplicate keys {dup} at line {node.start_mark.line + 1}"
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct)
    yaml.load(PAPER.read_text(), Loader=Strict)
