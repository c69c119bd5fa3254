"""Handing the accelerators between inference and training: deploy an engine, release every engine, wait for room.

The driver keeps the engines deployed through the inference phases (assess -> augment -> next teach),
deletes every Serve app before training and waits until the cluster has its resources back and its GPUs'
memory free (``mmdc.actors.release``), so the trainer's workers can take the GPUs; after training it
deploys the new student checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
from ray import serve

from mmdc.actors.release import Probe, RayProbe, wait_until_released
from mmdc.actors.resources import wait_for
from mmdc.config import EngineConfig, TrainConfig
from mmdc.engines.backends import build_engine_app, deploy_app

Announce = Callable[[str], None]


def deploy_engine(name: str, engine: EngineConfig, model_path: str) -> float:
    """Serve ``model_path`` as the app ``name`` (nothing for an ``openai`` endpoint); returns the seconds it took."""
    start = time.perf_counter()
    app = build_engine_app(engine, model_path, engine_name=name)
    if app is not None:
        serve.start(proxy_location="Disabled")
        deploy_app(app, name)  # a replica that refuses its device raises EngineRefused: one line naming the key
    return time.perf_counter() - start


def remove_stale_apps(engines: list[str], announce: Announce) -> None:
    """Delete the apps of ``engines`` that a crashed earlier attempt left deployed (they hold resources)."""
    try:
        apps = set(serve.status().applications)
    except Exception:  # noqa: BLE001 - Serve not started on this cluster: nothing is stale
        return
    for name in sorted(apps & set(engines)):
        serve.delete(name)
        announce(f"removed the {name} engine left by an earlier attempt")


def release_engines(deployed: dict[str, EngineConfig], timeout_s: float = 180, probe: Probe | None = None) -> float:
    """Delete the Serve apps of ``deployed`` and wait until the cluster is really free (``mmdc.actors.release``:
    Ray's CPU and GPU counts, no placement group left reserving GPUs, every GPU's memory free); seconds taken.
    TimeoutError naming what still holds after ``timeout_s``."""
    start = time.perf_counter()
    names = [name for name, engine in deployed.items() if engine.backend != "openai"]
    for name in names:  # all at once, so their replicas stop side by side rather than one app after the other
        serve.delete(name, _blocking=False)
    if names:
        wait_for(lambda: not set(names) & set(serve.status().applications), timeout_s, f"deleting {names}", 0.1)
    wait_until_released(probe or RayProbe(), timeout_s)
    return time.perf_counter() - start


def await_trainer_resources(train: TrainConfig, announce: Announce, timeout_s: float = 180) -> None:
    """Wait until the trainer's workers fit in what is free now, or say in the log what holds it.

    After a crash, Ray reclaims the dead attempt's workers and placement groups asynchronously; starting
    the trainer before that only queues it behind them. Never fails: on a shared cluster something else
    may hold resources, and Ray Train then waits for them itself.
    """
    need = {"CPU": train.num_workers * train.cpus_per_worker, "GPU": train.num_workers * train.gpus_per_worker}

    def free() -> bool:
        available = ray.available_resources()
        return all(available.get(r, 0.0) >= n - 1e-6 for r, n in need.items() if n > 0)

    try:
        wait_for(free, timeout_s=timeout_s, what="the trainer's resources")
    except TimeoutError:
        announce(f"the trainer needs {need} but only {ray.available_resources()} is free; starting anyway")
