"""cluster/: launcher YAMLs validate against Ray's own schema, the KubeRay RayJob has what KubeRay
requires, and the Grafana dashboard names only metrics that mmdc/metrics.py defines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from mmdc.metrics import prometheus_names

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER_YAMLS = sorted(p for p in CLUSTER.glob("*.yaml") if not p.name.startswith("kuberay"))
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def test_the_launcher_configs_exist():
    assert {p.name for p in LAUNCHER_YAMLS} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_config_validates_against_rays_schema(path):
    schema = json.loads(RAY_SCHEMA.read_text())
    cfg = _load(path)
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.path))
    assert not errors, f"{path.name}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_catches_a_broken_config():
    # guards the test above: the schema really is applied (an unknown top-level key is refused)
    schema = json.loads(RAY_SCHEMA.read_text())
    cfg = _load(CLUSTER / "aws.yaml")
    cfg["not_a_key"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, schema)


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_config_has_cpu_head_and_autoscaling_gpu_workers_for_six_gpus(path):
    cfg = _load(path)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_per_node = {"p3dn.24xlarge": 8}  # AWS types are auto-detected; GCP states its resources
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert workers, f"{path.name} has no worker node type"
    total = 0
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{path.name}: {name} must scale from 0"
        gpus = t["resources"].get("GPU") or gpu_per_node[t["node_config"]["InstanceType"]]
        total += gpus * t["max_workers"]
    assert total >= 6
    assert cfg["max_workers"] >= max(t["max_workers"] for t in workers.values())


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_config_installs_the_project_on_cuda12_with_token_auth(path):
    cfg = _load(path)
    image = cfg["docker"]["image"]
    assert re.search(r"-cu12\d$", image), f"{path.name}: V100 needs a CUDA 12.x image, got {image}"
    setup = "\n".join(cfg["setup_commands"])
    assert re.search(r'pip install .*-e "\.\[gpu\]"', setup)
    assert re.search(r"torch==[\d.]+\".*whl/cu12\d", setup), "torch must be pinned to a CUDA 12.x build"
    assert "cu13" not in setup
    assert cfg["file_mounts"]["/home/ray/mmdc"] == "."
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in cfg[key]), f"{path.name}: {key}"
    assert any("--head" in c and "--dashboard-host=0.0.0.0" in c for c in cfg["head_start_ray_commands"])


def test_kuberay_rayjob_has_the_fields_kuberay_requires():
    job = _load(CLUSTER / "kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"] == "python -m mmdc.run --config configs/paper.yaml"
    yaml.safe_load(spec["runtimeEnvYAML"])  # an embedded YAML string: must parse too
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"], "head needs a container"
    assert "rayStartParams" in head
    groups = cluster["workerGroupSpecs"]
    assert groups
    gpus = 0
    for g in groups:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas"):
            assert key in g, f"worker group missing {key}"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert "rayStartParams" in g
        (container,) = g["template"]["spec"]["containers"]
        limit = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert limit >= 1
        gpus += limit * g["maxReplicas"]
    assert gpus >= 6


def test_grafana_dashboard_names_only_defined_metrics():
    dash = json.loads((CLUSTER / "grafana" / "mmdc-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs.append(dash["templating"]["list"][1]["query"]["query"])
    used = {m for e in exprs for m in re.findall(r"\bray_mmdc_\w+", e)}
    assert used, "the dashboard shows no mmdc metric"
    unknown = used - prometheus_names()
    assert not unknown, f"dashboard uses metrics mmdc/metrics.py does not define: {sorted(unknown)}"
    # and every panel is a real query
    assert all(p.get("targets") for p in dash["panels"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_dashboard_covers_the_issue_metrics():
    text = (CLUSTER / "grafana" / "mmdc-dashboard.json").read_text()
    for name in ("ray_mmdc_rows_total", "ray_mmdc_hard_ratio", "ray_mmdc_acceptance_ratio", "ray_mmdc_unscored_total",
                 "ray_mmdc_train_loss", "ray_mmdc_train_samples_per_second", "ray_mmdc_phase_last_duration_seconds",
                 "ray_mmdc_iteration", "ray_mmdc_phase_active"):
        assert name in text, name
