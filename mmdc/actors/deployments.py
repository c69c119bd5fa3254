"""The engines a run has deployed now: which model each serves, and the clients bound to them.

The driver asks for an engine by name and model path; ``Deployments`` deploys it only when it serves
something else, releases every engine at once before training (``mmdc.actors.handover``), logs both to the
run's metrics, and hands out the Ray Data processors and evaluation generators that talk to what it serves.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from mmdc.actors.handover import Announce, deploy_engine, release_engines
from mmdc.actors.release import Probe
from mmdc.config import EngineConfig
from mmdc.engines.backends import deployment_name
from mmdc.engines.processors import ProcessorSpec, processor_spec
from mmdc.eval.serve import ServeGenerator


class Deployments:
    """One run's Serve engines (``engines``: name -> config) and the model path each serves now."""

    def __init__(
        self,
        engines: dict[str, EngineConfig],
        run_seed: int,
        log_metrics: Callable[[dict], None],
        announce: Announce,
        probe: Probe | None = None,
    ):
        self.engines = engines
        self.run_seed = run_seed
        self.log_metrics = log_metrics
        self.announce = announce
        self.probe = probe  # how a release reads the cluster (None: the connected Ray cluster)
        self.serving: dict[str, str] = {}  # engine name -> the model path it serves now
        self.scope = f"run-{uuid.uuid4().hex}"  # this run's Ray Data worker processes (ProcessorSpec)

    def deploy(self, engine: str, model_path: str) -> None:
        """Make ``engine`` serve ``model_path`` (no-op when it already does)."""
        if self.serving.get(engine) == model_path:
            return
        wall_s = deploy_engine(engine, self.engines[engine], model_path)
        self.serving[engine] = model_path
        self.log_metrics({"event": "deploy", "engine": engine, "model": model_path, "wall_s": round(wall_s, 3)})
        self.announce(f"deployed {engine}: {model_path}")

    def release(self) -> None:
        """Delete every deployed engine and wait until the cluster has its resources back."""
        if not self.serving:
            return
        wall_s = release_engines({name: self.engines[name] for name in self.serving}, probe=self.probe)
        self.serving.clear()
        self.log_metrics({"event": "release", "wall_s": round(wall_s, 3)})

    def processor(
        self, cls: type, engine: str, model_path: str, sampling: Any, image_root: str | None, **extra: Any
    ) -> ProcessorSpec:
        """A Ray Data processor ``cls`` (``extra``: its own kwargs) asking ``engine`` serving ``model_path``."""
        self.deploy(engine, model_path)
        return processor_spec(
            cls,
            engine,
            self.engines[engine],
            model_path,
            sampling,
            run_seed=self.run_seed,
            image_root=image_root,
            scope=self.scope,
            **extra,
        )

    def generator(self, engine: str, model_path: str, role: str) -> ServeGenerator:
        """An evaluation generator for ``role`` over ``engine`` serving ``model_path``."""
        self.deploy(engine, model_path)
        return ServeGenerator(engine, deployment_name(model_path), self.engines[engine], role=role)


__all__ = ["Deployments"]
