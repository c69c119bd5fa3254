"""Tests for ``python -m mmdc.plan`` (mmdc/plan.py): exit status, one line per problem, the CPU plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmdc.plan import main

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")

V100_HF = {
    "data": {"source": "llava", "instructions": "/data/llava_instruct_80k.json"},
    "models": {"teacher": "llava-hf/llava-1.5-13b-hf", "student_init": "assemble"},
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
    "align": {
        "num_workers": 6,
        "gpus_per_worker": 1,
        "global_batch_size": 96,
        "micro_batch_size": 8,
        "precision": "fp16",
        "gradient_checkpointing": True,
    },
    "tune": {
        "num_workers": 6,
        "gpus_per_worker": 1,
        "global_batch_size": 96,
        "micro_batch_size": 4,
        "precision": "fp16",
        "gradient_checkpointing": True,
        "zero_stage": 3,
        "offload_optimizer": True,
    },
    "pipeline": {"concurrency": 6},
    "eval": {"enabled": False},
}


@pytest.fixture
def v100_config(tmp_path):
    path = tmp_path / "v100.yaml"
    path.write_text(yaml.safe_dump(V100_HF))
    return str(path)


def test_a_fitting_config_prints_every_phase_and_exits_0(v100_config, capsys):
    assert main(["--config", v100_config, "--gpu", "v100-32gb", "--gpus", "6"]) == 0
    out = capsys.readouterr().out
    for phase in ("align", "teach", "tune", "assess", "augment"):
        assert f"\n{phase}  (runs" in out
    assert "13.35B parameters" in out and "7.06B parameters" in out
    assert "No problems" in out


def test_zero_2_on_v100_is_refused_with_one_line_naming_phase_and_key(v100_config, capsys):
    code = main(
        [
            "--config",
            v100_config,
            "--gpu",
            "v100-32gb",
            "--gpus",
            "6",
            "--set",
            "tune.zero_stage=2",
            "--set",
            "tune.offload_optimizer=false",
        ]
    )
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    problems = [line for line in lines if line.startswith("mmdc plan: ")]
    assert len(problems) == 1
    assert problems[0].startswith("mmdc plan: tune: ") and "tune.zero_stage=3" in problems[0]


def test_the_tiny_cpu_config_plans_host_ram_and_succeeds(capsys):
    assert main(["--config", TINY]) == 0
    out = capsys.readouterr().out
    assert "on the CPU" in out and "host RAM GiB" in out and "tiny spec" in out


def test_bad_arguments_exit_2(v100_config, tmp_path, capsys):
    assert main(["--config", v100_config, "--gpu", "k80"]) == 2
    assert "unknown GPU 'k80'" in capsys.readouterr().err
    assert main(["--config", v100_config, "--gpu", "v100-32gb", "--model-config", "no-equals-sign"]) == 2
    assert main(["--config", v100_config, "--set", "tune.zero_stage=7"]) == 2
    assert "config error" in capsys.readouterr().err
    assert main(["--config", v100_config]) == 2  # GPUs asked for, no --gpu named
    assert "--gpu" in capsys.readouterr().err


def test_model_config_flag_sizes_an_unknown_model(tmp_path, capsys):
    from mmdc.sizing.architectures import PUBLISHED_CONFIGS

    config = tmp_path / "config.json"
    config.write_text(json.dumps(PUBLISHED_CONFIGS["llava-hf/llava-1.5-7b-hf"]))
    tree = {**V100_HF, "models": {"teacher": "my-org/my-llava", "student_init": "assemble"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert main(["--config", str(path), "--gpu", "a100-80gb"]) == 2
    assert "--model-config my-org/my-llava=PATH" in capsys.readouterr().err
    assert main(["--config", str(path), "--gpu", "a100-80gb", "--model-config", f"my-org/my-llava={config}"]) == 0
    assert f"source: --model-config {config}" in capsys.readouterr().out
