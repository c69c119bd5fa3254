"""``ServeGenerator``: the evaluation harness's ``Generator`` over a run's already-deployed engine.

Why: the Driver evaluates the student after every iteration while the student
engine is deployed anyway (assessment needs it). Loading the checkpoint a
second time in the driver actor would cost memory (a GPU, on a cluster) and
could disagree with what the engine serves. So the harness talks to the engine
the way the Ray Data processors do: ``mmdc.engines.backends.make_client`` (a Serve
handle for hf / vllm, HTTP for an openai endpoint) and ``call_with_retries``,
so a replica that dies mid-evaluation is retried like in any other phase.

    gen = ServeGenerator("student", deployment_name(model_path), cfg.engines["student"], role="student")
    metrics, samples, meta = run_task(task, gen)
"""

from __future__ import annotations

from mmdc.config import EngineConfig
from mmdc.engines.backends import make_client, retry_policy
from mmdc.engines.protocol import call_with_retries


class ServeGenerator:
    """``generate(requests) -> [{"text": ...}]`` through one engine of a run (no model in this process)."""

    def __init__(self, app_name: str, deployment: str, engine: EngineConfig | None = None, role: str = "student"):
        engine = engine or EngineConfig()
        self.role = role
        self.client = make_client(engine, app_name, deployment, engine.request_timeout_s)
        self.policy = retry_policy(engine)

    def generate(self, requests: list[dict]) -> list[dict]:
        """One response per request, in order; rows are named by their seed in errors (unique per sample)."""
        ids = [f"eval-seed-{r.get('seed')}" for r in requests]
        return call_with_retries(self.client, requests, ids, f"{self.role} (eval)", self.policy)


def endpoint_judge(
    url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout_s: float = 120.0
) -> ServeGenerator:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint (GPT-4o, ``vllm serve``, ...), reached with
    the ``openai`` backend's client: the key read from ``api_key_env``, 408/429/5xx and timeouts retried."""
    engine = EngineConfig(
        backend="openai",
        base_url=url,
        model_name=model,
        api_key_env=api_key_env,
        replicas=0,
        num_cpus=0,
        request_timeout_s=timeout_s,
    )
    return ServeGenerator("judge", model, engine, role="judge")


__all__ = ["ServeGenerator", "endpoint_judge"]
