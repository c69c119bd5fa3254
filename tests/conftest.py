"""Shared pytest fixtures.

Unit tests never touch Ray. Integration tests share one small real local Ray
cluster, started once per session by ``ray_cluster`` (Ray removed local_mode).
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """Start a 2-CPU local Ray cluster for the whole test session and stop it at the end."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # address="local": always a new cluster of our own, never one that another process (or the
    # job-submit test's head) started on this machine.
    # metrics_report_interval_ms: workers push ray.util.metrics to the node's Prometheus endpoint every
    # second instead of every 10 s, so the driver actor's last values are exported before it exits
    # (test_metrics_endpoint.py). The endpoint itself needs no dashboard.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # serve may never have started
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, str]:
    """The untrained tiny teacher and student checkpoints, built once into the models folder (no Ray needed)."""
    from mmdc.world.models import models_dir
    from mmdc.world.scenes import world_corpus
    from mmdc.world.tiny import ensure_tiny_models

    return ensure_tiny_models(models_dir(), world_corpus(), seed=0)


@pytest.fixture(scope="session")
def tiny_student(tiny_models: dict[str, str]) -> str:
    """The untrained tiny student checkpoint: an engine to serve or a model to evaluate."""
    return tiny_models["student"]
