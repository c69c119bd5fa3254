"""Tests for mmdc/sizing/plan.py: what ``check`` refuses, with which key, and what it lets through.

The configs are built here (not read from configs/), so the tests say exactly which setup they judge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mmdc.config import config_from_dict, load_config
from mmdc.sizing import check
from mmdc.sizing.gpus import get_gpu

TRAIN = {
    "strategy": "deepspeed",
    "num_workers": 6,
    "cpus_per_worker": 4,
    "gpus_per_worker": 1,
    "global_batch_size": 96,
    "precision": "fp16",
    "gradient_checkpointing": True,
    "max_length": 2048,
}


def paper_v100(**sections) -> dict:
    """The paper's 6 x V100 setup on the hf backend: fp16, SDPA, DeepSpeed ZeRO-3 with optimizer offload."""
    tree = {
        "data": {"source": "llava", "instructions": "/data/llava_instruct_80k.json"},
        "models": {
            "teacher": "llava-hf/llava-1.5-13b-hf",
            "student_init": "assemble",
            "vision_tower": "openai/clip-vit-large-patch14",
            "language_model": "lmsys/vicuna-7b-v1.1",
        },
        "engines": {
            "teacher": {
                "backend": "hf",
                "replicas": 4,
                "num_gpus": 1,
                "max_batch_size": 2,
                "dtype": "float16",
                "attention": "sdpa",
            },
            "student": {
                "backend": "hf",
                "replicas": 2,
                "num_gpus": 1,
                "max_batch_size": 8,
                "dtype": "float16",
                "attention": "sdpa",
            },
        },
        "roles": {
            "teacher": {"max_new_tokens": 512},
            "referee": {"max_new_tokens": 128},
            "augmentor": {"max_new_tokens": 96},
            "student": {"max_new_tokens": 512},
        },
        "align": {**TRAIN, "zero_stage": 2, "micro_batch_size": 8, "lr": 2e-3},
        "tune": {**TRAIN, "zero_stage": 3, "micro_batch_size": 4, "offload_optimizer": True},
        "pipeline": {"concurrency": 6},
        "eval": {"benchmarks": ["scienceqa"], "scienceqa": {"data": "/data/sqa.json"}},
    }
    for name, section in sections.items():
        tree[name] = {**tree.get(name, {}), **section}
    return tree


def test_the_paper_setup_fits_six_v100():
    plan = check(config_from_dict(paper_v100()), "v100-32gb", 6)
    assert plan.problems == [], [str(p) for p in plan.problems]
    names = [p.name for p in plan.phases]
    assert names == ["align", "teach", "tune", "eval", "assess", "augment", "eval_teacher"]
    gpus = {p.name: p.gpus for p in plan.phases}
    assert gpus["assess"] == gpus["tune"] == gpus["align"] == 6 and gpus["teach"] == 4
    usable = get_gpu("v100-32gb").usable_bytes
    assert all(0 < p.per_gpu <= usable for p in plan.phases)
    assert all(p.seconds and p.seconds > 0 for p in plan.phases)
    assert set(plan.models) == {"teacher", "student"}
    text = plan.render()
    assert "No problems" in text and "Assumptions" in text and "source: published config.json values" in text


def test_zero_2_is_refused_with_the_key_and_alternatives():
    cfg = config_from_dict(paper_v100(tune={"zero_stage": 2, "offload_optimizer": False}))
    plan = check(cfg, "v100-32gb", 6)
    (problem,) = plan.problems
    assert problem.phase == "tune" and problem.key == "tune.zero_stage"
    assert "tune.zero_stage=3" in problem.message and "offload_optimizer=true" in problem.message
    assert "tune.lora.enabled=true" in problem.message
    assert "\n" not in str(problem)


def test_zero_3_fits_without_offload_now_that_load_and_save_never_hold_the_whole_model():
    """Issue 25: with the loader in fp16 / zero.Init and the save consolidating one module at a time, ZeRO-3 without
    optimizer offload fits a V100 (it was refused for the save's whole-model gather)."""
    plan = check(config_from_dict(paper_v100(tune={"offload_optimizer": False})), "v100-32gb", 6)
    assert plan.problems == [], [str(p) for p in plan.problems]
    tune = next(p for p in plan.phases if p.name == "tune").deployments[0]
    assert any("partitioned by zero.Init" in line and "one module at a time" in line for line in tune.lines)
    note = next(n for n in plan.notes if n.key == "models.student_init")
    assert "float16" in note.message and "Ray task" in note.message


def test_vllm_on_volta_is_one_line_for_every_phase():
    engines = {
        "teacher": {"backend": "vllm", "replicas": 2, "num_gpus": 2, "tensor_parallel_size": 2, "max_batch_size": 32}
    }
    plan = check(config_from_dict(paper_v100(engines=engines)), "v100-32gb", 6)
    vllm = [p for p in plan.problems if p.key == "engines.teacher.backend"]
    assert len(vllm) == 1
    assert vllm[0].phase.startswith("teach, ") and "backend hf" in vllm[0].message
    # the same engine passes on an A100 (compute capability 8.0)
    assert [
        p
        for p in check(config_from_dict(paper_v100(engines=engines)), "a100-80gb", 6).problems
        if p.key == "engines.teacher.backend"
    ] == []


def test_bf16_needs_ampere():
    tree = paper_v100(tune={"precision": "bf16"})
    tree["engines"]["student"]["dtype"] = "bfloat16"
    keys = {p.key for p in check(config_from_dict(tree), "v100-32gb", 6).problems}
    assert {"tune.precision", "engines.student.dtype"} <= keys
    assert not check(config_from_dict(tree), "a100-80gb", 6).problems


def test_too_few_gpus_and_too_much_memory():
    plan = check(config_from_dict(paper_v100()), "v100-32gb", 4)
    assert {p.phase for p in plan.problems} >= {"align", "tune", "assess"}
    tree = paper_v100()
    tree["engines"]["teacher"]["dtype"] = "float32"
    (problem,) = check(config_from_dict(tree), "v100-32gb", 6).problems
    assert problem.key == "engines.teacher.dtype" and "float16 instead of float32" in problem.message


def test_vllm_kv_cache_and_max_model_len():
    engines = {
        "teacher": {
            "backend": "vllm",
            "replicas": 4,
            "num_gpus": 1,
            "tensor_parallel_size": 1,
            "max_batch_size": 32,
            "max_model_len": 4096,
        }
    }
    plan = check(config_from_dict(paper_v100(engines=engines)), "l4", 6)  # 24.9 GiB of weights on 22.5 GiB
    assert any(p.key == "engines.teacher.tensor_parallel_size" for p in plan.problems)
    engines["teacher"].update(num_gpus=2, tensor_parallel_size=2, replicas=2, max_model_len=1024)
    plan = check(config_from_dict(paper_v100(engines=engines)), "a100-80gb", 6)
    assert any(p.key == "engines.teacher.max_model_len" for p in plan.problems)  # referee prompts are longer


def test_cpu_config_plans_without_a_gpu():
    plan = check(load_config(None), None)
    assert plan.problems == [] and plan.gpu is None
    assert all(p.host > 0 and p.gpus == 0 for p in plan.phases)
    assert "tiny spec" in plan.models["teacher"].source
    assert "host RAM GiB" in plan.render()


def test_gpu_config_without_a_gpu_kind_is_refused():
    (problem,) = check(config_from_dict(paper_v100()), None).problems
    assert problem.key == "--gpu"


def test_unknown_model_is_a_problem_naming_the_flag(tmp_path):
    tree = paper_v100(models={"teacher": "my-org/llava-next"})
    plan = check(config_from_dict(tree), "v100-32gb", 6)
    assert [p.key for p in plan.problems] == ["models.teacher"]
    assert "--model-config my-org/llava-next=PATH" in plan.problems[0].message
    config = tmp_path / "config.json"
    import json

    from mmdc.sizing.architectures import PUBLISHED_CONFIGS

    config.write_text(json.dumps(PUBLISHED_CONFIGS["llava-hf/llava-1.5-13b-hf"]))
    plan = check(config_from_dict(tree), "v100-32gb", 6, model_configs={"my-org/llava-next": str(config)})
    assert plan.problems == [] and plan.models["teacher"].source == f"--model-config {config}"


def test_sizing_imports_only_the_config_and_third_party_libraries():
    root = Path(__file__).resolve().parents[3] / "mmdc" / "sizing"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                if name == "mmdc" or name.startswith("mmdc."):
                    assert name == "mmdc.config" or name.startswith("mmdc.sizing"), f"{path.name} imports {name}"


@pytest.mark.parametrize("gpu", ["a100-80gb", "h100-80gb"])
def test_bigger_gpus_fit_with_more_headroom(gpu):
    v100 = check(config_from_dict(paper_v100()), "v100-32gb", 6)
    big = check(config_from_dict(paper_v100()), gpu, 6)
    assert not big.problems
    assert sum(p.seconds for p in big.phases) < sum(p.seconds for p in v100.phases)
