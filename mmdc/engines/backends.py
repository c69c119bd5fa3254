"""Which backend serves an engine and how a processor reaches it: two table lookups, no if-else tower.

One engine per distinct model: the teacher, referee and augmentor share the teacher's engine
(they are prompt layers in ``mmdc.roles``); the student has its own. Every backend speaks
the same protocol (``mmdc.engines.protocol``), so roles never know which one they talk to:

    request  = {"messages": [...OpenAI chat messages, images as data: URLs...],
                "temperature": 0.5, "max_new_tokens": 64, "seed": 1234}
    response = {"text": "...", "prompt_tokens": 250, "completion_tokens": 12, "finish_reason": "stop"}

Two functions carry the backend choice, each a table lookup, not an if-else tower:

    app = build_engine_app(engine_cfg, model_path)   # a Serve app for hf / vllm; None for openai
    deploy_app(app, name)                            # deploy, wait; a device refusal comes back as its one line
    client = make_client(engine_cfg, app_name, deployment, timeout_s)   # inside a Ray Data processor

backend   deployed as                                   reached by
hf        HFEngine (transformers generate)              Serve handle, per batch or per row
vllm      VLLMChat -> LLMServer (ray.serve.llm)         Serve handle, per batch or per row
openai    nothing (an external URL)                     HTTP POST /chat/completions per row
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from ray import serve

from mmdc.config import EngineConfig
from mmdc.engines.capability import EngineRefused, refusal_in
from mmdc.engines.hf import build_hf_app
from mmdc.engines.openai import OpenAIChatClient
from mmdc.engines.protocol import EngineClient, RetryPolicy
from mmdc.engines.serve_client import ServeBatchClient, ServeRowClient


def deployment_name(model: str) -> str:
    """Serve deployment name derived from the model id or path (Ray's LLM library does the same)."""
    stem = Path(model.rstrip("/")).name or model
    parent = Path(model.rstrip("/")).parent.name
    if re.fullmatch(r"iter_\d+|align|student", stem) and parent:
        stem = f"{parent}-{stem}"
    return "hf-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", stem)[:60]


def _build_vllm_app(engine: EngineConfig, model_path: str, name: str, engine_name: str | None = None):
    from mmdc.engines.vllm import build_vllm_app  # the module is light; ray.serve.llm loads inside

    return build_vllm_app(engine, model_path, name, engine_name)


_APP_BUILDERS = {"hf": build_hf_app, "vllm": _build_vllm_app}


def build_engine_app(engine: EngineConfig, model_path: str, engine_name: str | None = None) -> serve.Application | None:
    """Serve application for one engine config (builder pattern of Ray's LLM library).

    The ingress deployment is named ``deployment_name(model_path)`` for every backend. ``None``
    for ``openai``: an external endpoint has nothing to deploy. An engine whose device cannot run its
    backend, dtype or attention kernel fails at deploy with a one-line ``EngineRefused`` naming
    ``engines.<engine_name>.<key>`` (default name: the Serve app's; see capability.py and ``refusal_in``).
    """
    builder = _APP_BUILDERS.get(engine.backend)
    return builder(engine, model_path, deployment_name(model_path), engine_name) if builder else None


def deploy_app(app: serve.Application, name: str, route_prefix: str | None = None, poll_s: float = 0.1) -> None:
    """Deploy ``app`` as ``name`` and wait until it runs; a replica's ``EngineRefused`` comes back as itself.

    ``serve.run`` looks at the app's status once a second, so every deploy took a whole number of seconds;
    this looks every ``poll_s`` (``serve.run_many`` without its wait, then ``serve.status``). Serve reports an
    app whose replicas fail in ``__init__`` as "Deploying application <name> failed: Failed to update the
    deployments [...]": the replica's error is only in the deployment's status message, as a traceback. This
    finds the refusal's one line there and raises it alone; any other failure is raised as Serve words it.
    """
    try:
        serve.run_many(
            [serve.RunTarget(app, name=name, route_prefix=route_prefix)], wait_for_applications_running=False
        )
        _wait_running(name, poll_s)
    except RuntimeError as err:
        line = refusal_in(err) or _refusal_in_status(name)
        if line is None:
            raise
        raise EngineRefused(line) from None


def _wait_running(name: str, poll_s: float) -> None:
    """Until the app ``name`` is RUNNING; RuntimeError worded as ``serve.run``'s when it fails or is gone."""
    while True:
        app = serve.status().applications.get(name)
        if app is None:
            raise RuntimeError(f"Waiting for application {name} to be RUNNING, but application doesn't exist.")
        if app.status == "RUNNING":
            return
        if app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"Deploying application {name} failed: {app.message}")
        time.sleep(poll_s)


def _refusal_in_status(name: str) -> str | None:
    try:
        app = serve.status().applications.get(name)
    except Exception:  # noqa: BLE001 - no status to read: nothing more to say than serve.run did
        return None
    messages = [app.message] + [d.message for d in app.deployments.values()] if app else []
    return next((line for m in messages if m and (line := refusal_in(RuntimeError(m)))), None)


def make_client(engine: EngineConfig, app_name: str, deployment: str, timeout_s: float) -> EngineClient:
    """The client a Ray Data processor uses to reach ``engine`` (see the table in the module doc)."""
    if engine.backend == "openai":
        return OpenAIChatClient.from_env(
            engine.base_url or "",
            engine.model_name or "",
            timeout_s,
            engine.api_key_env,
            max_concurrency=engine.max_concurrency,
            requests_per_s=engine.requests_per_s,
        )
    handle = serve.get_deployment_handle(deployment, app_name=app_name)
    if engine.request_mode == "row":
        return ServeRowClient(handle, timeout_s)
    return ServeBatchClient(handle, timeout_s)


def retry_policy(engine: EngineConfig) -> RetryPolicy:
    return RetryPolicy(max_retries=engine.max_retries, backoff_s=engine.retry_backoff_s)


__all__ = ["build_engine_app", "deploy_app", "deployment_name", "make_client", "retry_policy"]
