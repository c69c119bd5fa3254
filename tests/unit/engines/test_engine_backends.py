"""Backend choice and config building: vllm's LLMConfig kwargs (no vLLM imported), openai and hf wiring."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mmdc.actors.resources import check_fits
from mmdc.config import ConfigError, EngineConfig, load_config

PAPER = Path(__file__).resolve().parents[3] / "configs" / "paper.yaml"
VLLM_TEACHER = [
    "engines.teacher.backend=vllm",
    "engines.teacher.tensor_parallel_size=2",
    "engines.teacher.num_gpus=2",
    "engines.teacher.replicas=2",
]


def test_vllm_llm_config_from_the_paper_config_without_importing_vllm():
    before = set(sys.modules)
    from mmdc.engines.vllm import vllm_llm_config

    cfg = load_config(
        PAPER,
        VLLM_TEACHER
        + [
            "engines.teacher.accelerator_type=V100",
            "engines.teacher.engine_kwargs={enforce_eager: true, max_num_seqs: 32}",
        ],
    )
    kw = vllm_llm_config(cfg.engines["teacher"], cfg.models.teacher)
    new = set(sys.modules) - before
    assert not [m for m in new if m.split(".")[0] == "vllm" or m.startswith(("ray.serve.llm", "ray.llm"))]
    assert kw["model_loading_config"] == {
        "model_id": "llava-hf/llava-1.5-13b-hf",
        "model_source": "llava-hf/llava-1.5-13b-hf",
    }
    e = kw["engine_kwargs"]
    assert e["tensor_parallel_size"] == 2 and e["dtype"] == "float16"  # V100: fp16
    assert e["max_model_len"] == 4096 and e["gpu_memory_utilization"] == 0.9
    assert e["limit_mm_per_prompt"] == {"image": 1}
    assert e["enforce_eager"] is True and e["max_num_seqs"] == 32  # engine_kwargs win over derived values
    assert kw["deployment_config"]["num_replicas"] == 2
    assert kw["deployment_config"]["graceful_shutdown_wait_loop_s"] == 0.1  # deleted only when idle: no 2 s drain
    assert kw["accelerator_type"] == "V100"


def test_paper_config_with_a_vllm_teacher_still_fits_six_v100():
    cfg = load_config(PAPER, VLLM_TEACHER)
    assert check_fits(cfg, {"CPU": 56, "GPU": 6}) == []


def test_vllm_needs_num_gpus_equal_to_tensor_parallel_size():
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        load_config(
            None,
            ["engines.teacher.backend=vllm", "engines.teacher.tensor_parallel_size=2", "engines.teacher.num_gpus=1"],
        )


def test_openai_needs_a_url_and_a_model_name_and_deploys_nothing():
    with pytest.raises(ConfigError, match="base_url"):
        load_config(None, ["engines.teacher.backend=openai", "engines.teacher.model_name=gpt-4o"])
    with pytest.raises(ConfigError, match="model_name"):
        load_config(None, ["engines.teacher.backend=openai", "engines.teacher.base_url=http://127.0.0.1:8000/v1"])
    cfg = load_config(
        None,
        [
            "engines.teacher.backend=openai",
            "engines.teacher.base_url=http://127.0.0.1:8000/v1",
            "engines.teacher.model_name=gpt-4o",
            "engines.teacher.replicas=0",
            "engines.teacher.num_cpus=0",
        ],
    )
    from mmdc.engines.backends import build_engine_app, make_client
    from mmdc.engines.openai import OpenAIChatClient

    engine = cfg.engines["teacher"]
    assert build_engine_app(engine, "gpt-4o") is None
    client = make_client(engine, "teacher", "unused", timeout_s=5)
    assert isinstance(client, OpenAIChatClient) and client.url == "http://127.0.0.1:8000/v1/chat/completions"


def test_more_hf_replicas_than_clients_is_a_warning_naming_both_keys(caplog):
    # an hf replica in batch mode works on one client's batch at a time: the extra replicas would idle
    with caplog.at_level("WARNING", logger="mmdc.config"):
        load_config(None, ["engines.student.replicas=3", "pipeline.concurrency=2"])
    assert "engines.student.replicas (3) > pipeline.concurrency (2)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmdc.config"):
        load_config(
            None,
            [
                "engines.student.replicas=2",
                "pipeline.concurrency=2",
                "engines.teacher.replicas=4",
                "engines.teacher.request_mode=row",
            ],
        )
    assert caplog.text == ""  # enough clients; row mode keeps many requests per replica


def test_request_mode_and_retry_settings_parse():
    cfg = load_config(
        None,
        [
            "engines.student.request_mode=row",
            "engines.student.max_retries=2",
            "engines.student.batch_wait_timeout_s=0.2",
        ],
    )
    e = cfg.engines["student"]
    assert (e.request_mode, e.max_retries, e.batch_wait_timeout_s) == ("row", 2, 0.2)
    with pytest.raises(ConfigError, match="request_mode"):
        load_config(None, ["engines.student.request_mode=stream"])
    from mmdc.engines.backends import retry_policy

    assert retry_policy(EngineConfig(max_retries=3, retry_backoff_s=0.5)).delay(2) == 2.0


def test_vllm_app_without_vllm_says_how_to_install():
    pytest.importorskip("ray")
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    from mmdc.engines.backends import build_engine_app

    with pytest.raises(ImportError, match=r'pip install "mmdc\[vllm\]" on a CUDA machine'):
        build_engine_app(EngineConfig(backend="vllm", num_gpus=1), "llava-hf/llava-1.5-13b-hf")


def _fake_serve(monkeypatch, applications: dict):
    """``serve.run_many`` that deploys nothing and ``serve.status`` reading ``applications`` (name -> a list of
    statuses, one per look, the last one forever); returns the names deployed."""
    from types import SimpleNamespace

    from mmdc.engines import backends

    deployed: list[str] = []
    looks: dict[str, int] = {}

    def status():
        now = {}
        for name, seen in applications.items():
            looks[name] = looks.get(name, 0) + 1
            now[name] = seen[min(looks[name], len(seen)) - 1]
        return SimpleNamespace(applications=now)

    monkeypatch.setattr(backends.serve, "RunTarget", lambda app, name, route_prefix: name)
    monkeypatch.setattr(backends.serve, "run_many", lambda targets, **kw: deployed.extend(targets))
    monkeypatch.setattr(backends.serve, "status", status)
    return deployed


def _app(status: str, message: str = "", deployments: dict | None = None):
    from types import SimpleNamespace

    parts = {name: SimpleNamespace(message=m) for name, m in (deployments or {}).items()}
    return SimpleNamespace(status=status, message=message, deployments=parts)


def test_deploy_app_waits_until_the_app_runs(monkeypatch):
    from mmdc.engines import backends

    deployed = _fake_serve(monkeypatch, {"student": [_app("DEPLOYING")] * 3 + [_app("RUNNING")]})
    backends.deploy_app(object(), "student", poll_s=0.0)
    assert deployed == ["student"]
    _fake_serve(monkeypatch, {})
    with pytest.raises(RuntimeError, match="application doesn't exist"):  # deleted meanwhile
        backends.deploy_app(object(), "student", poll_s=0.0)


def test_deploy_app_raises_a_replicas_refusal_as_its_one_line(monkeypatch):
    """Serve's own error names only the failed deployment; the replica's traceback is in the deployment status."""
    from mmdc.engines import backends
    from mmdc.engines.capability import EngineRefused

    line = (
        "engines.student.dtype=bfloat16 cannot run on GPU Tesla V100-SXM2-32GB (compute capability 7.0): bf16 "
        "needs compute capability >= 8.0; set engines.student.dtype=float16"
    )
    replica_error = (
        "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or "
        "initial health check failing. See controller logs for details. Error:\n"
        "ray::ServeReplica:student:hf-student.initialize_and_get_metadata() (pid=1, ip=10.0.0.2)\n"
        f"mmdc.engines.capability.EngineRefused: {line}\n"
    )
    failed = "Failed to update the deployments ['hf-student']."
    _fake_serve(
        monkeypatch,
        {
            "student": [_app("DEPLOYING"), _app("DEPLOY_FAILED", failed, {"hf-student": replica_error})],
            "other": [_app("DEPLOY_FAILED", failed, {"hf-other": "replica ran out of memory"})],
        },
    )
    with pytest.raises(EngineRefused) as refused:
        backends.deploy_app(object(), "student", poll_s=0.0)
    assert str(refused.value) == line
    with pytest.raises(RuntimeError, match=r"Deploying application other failed: Failed to update") as other:
        backends.deploy_app(object(), "other", poll_s=0.0)  # no refusal in its status: Serve's error as it was
    assert not isinstance(other.value, EngineRefused)
