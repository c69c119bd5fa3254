"""``mmdc.run`` runs the plan's checks before it starts anything (``--gpu``, ``--gpus``, ``--dry-run``; no Ray here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmdc import plan as plan_cli
from mmdc import run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def v100_config(tmp_path):
    """tests/unit/test_plan.py's 6 x V100 config, with its data files present (mmdc.run checks them first)."""
    from tests.unit.test_plan import V100_HF

    (tmp_path / "images").mkdir()
    (tmp_path / "instructions.json").write_text("[]")
    (tmp_path / "captions.json").write_text("[]")
    tree = json.loads(json.dumps(V100_HF))
    tree["data"].update(
        instructions=str(tmp_path / "instructions.json"),
        image_folder=str(tmp_path / "images"),
        captions=str(tmp_path / "captions.json"),
    )
    tree["run"] = {"output_dir": str(tmp_path / "runs")}
    path = tmp_path / "v100.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the run gets as far as connecting to Ray."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(run, "connect_ray", refuse)


def test_dry_run_prints_the_plan_and_exits_without_starting_anything(v100_config, no_ray, capsys, tmp_path):
    assert run.main(["--config", v100_config, "--dry-run", "--gpu", "v100-32gb", "--gpus", "6"]) == 0
    out = capsys.readouterr().out
    assert "\ntune  (runs" in out and "No problems: every phase fits and runs on 6 x v100-32gb" in out
    assert not (tmp_path / "runs").exists()  # no run directory either


def test_a_plan_problem_stops_the_run_before_ray_with_one_line_each(v100_config, no_ray, capsys):
    args = ["--config", v100_config, "--gpu", "v100-32gb", "--gpus", "6"]
    code = run.main([*args, "--set", "tune.zero_stage=2", "--set", "tune.offload_optimizer=false"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmdc: plan: tune: ") and "tune.zero_stage=3" in lines[0]
    assert run.main([*args, "--gpu", "k80"]) == 2  # an unknown kind is refused too
    assert "unknown GPU 'k80'" in capsys.readouterr().err


def test_without_gpu_the_kind_comes_from_the_cluster_and_none_skips_the_gpu_part(v100_config, monkeypatch, capsys):
    from mmdc.config import load_config

    cfg = load_config(v100_config)
    monkeypatch.setattr(plan_cli, "cluster_gpus", lambda: (None, 0, "the cluster has no GPUs now"))
    assert plan_cli.preflight(cfg, None, None, v100_config, from_cluster=True) is None  # goes on
    assert "GPU part skipped (the cluster has no GPUs now)" in capsys.readouterr().out
    monkeypatch.setattr(plan_cli, "cluster_gpus", lambda: ("v100-16gb", 6, "6 GPUs labelled V100: planned as ..."))
    assert plan_cli.preflight(cfg, None, None, v100_config, from_cluster=True) == 2  # 16 GB cannot hold the teacher
    assert "mmdc: plan: " in capsys.readouterr().err


def test_a_cpu_run_is_checked_without_importing_deepspeed():
    code = (
        "import sys\n"
        "from mmdc import plan\n"
        "from mmdc.config import load_config\n"
        "plan.cluster_gpus = lambda: (None, 0, 'the cluster has no GPUs now')\n"
        "status = plan.preflight(load_config('configs/tiny.yaml'), None, None, 'tiny', from_cluster=True)\n"
        "print(status, 'deepspeed' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "None False"
