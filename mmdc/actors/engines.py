"""Engines: the models that answer the roles' chat requests, and how a stage reaches them.

One engine per distinct model: the teacher, referee and augmentor share the teacher's engine
(they are prompt layers in ``mmdc.actors.roles``); the student has its own. Every backend speaks
the same protocol (``mmdc.actors.backends.protocol``), so roles never know which one they talk to:

    request  = {"messages": [...OpenAI chat messages, images as data: URLs...],
                "temperature": 0.5, "max_new_tokens": 64, "seed": 1234}
    response = {"text": "...", "prompt_tokens": 250, "completion_tokens": 12, "finish_reason": "stop"}

Two functions carry the backend choice, each a table lookup, not an if-else tower:

    app = build_engine_app(engine_cfg, model_path)   # a Serve app for hf / vllm; None for openai
    client = make_client(engine_cfg, app_name, deployment, timeout_s)   # inside a Ray Data stage

backend   deployed as                                   reached by
hf        HFEngine (transformers generate)              Serve handle, per batch or per row
vllm      VLLMChat -> LLMServer (ray.serve.llm)         Serve handle, per batch or per row
openai    nothing (an external URL)                     HTTP POST /chat/completions per row
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from ray import serve

from mmdc.actors.backends.hf import HFEngine, HFGenerator, build_hf_app
from mmdc.actors.backends.openai import OpenAIChatClient
from mmdc.actors.backends.protocol import EngineClient, EngineError, RetryPolicy, call_with_retries
from mmdc.actors.backends.serve_client import ServeBatchClient, ServeRowClient
from mmdc.config import EngineConfig


def deployment_name(model: str) -> str:
    """Serve deployment name derived from the model id or path (Ray's LLM library does the same)."""
    stem = Path(model.rstrip("/")).name or model
    parent = Path(model.rstrip("/")).parent.name
    if re.fullmatch(r"iter_\d+|align|student", stem) and parent:
        stem = f"{parent}-{stem}"
    return "hf-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", stem)[:60]


def model_fingerprint(model_dir: str) -> str:
    """A cheap identity for a frozen model: config, file names and sizes, and the weights' first MiB.

    Used in the teacher's answer-cache key. Hashing full 13B weights would take minutes; the
    config plus per-file size and head hash changes whenever the weights are retrained or swapped.
    """
    root = Path(model_dir)
    h = hashlib.sha256()
    if not root.is_dir():  # a hub id: the id itself is the identity
        h.update(model_dir.encode())
        return h.hexdigest()[:16]
    for path in sorted(root.iterdir()):
        if not path.is_file():
            continue
        h.update(path.name.encode())
        h.update(str(path.stat().st_size).encode())
        with path.open("rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _build_vllm_app(engine: EngineConfig, model_path: str, name: str):
    from mmdc.actors.backends.vllm import build_vllm_app  # the module is light; ray.serve.llm loads inside

    return build_vllm_app(engine, model_path, name)


_APP_BUILDERS = {"hf": build_hf_app, "vllm": _build_vllm_app}


def build_engine_app(engine: EngineConfig, model_path: str) -> serve.Application | None:
    """Serve application for one engine config (builder pattern of Ray's LLM library).

    The ingress deployment is named ``deployment_name(model_path)`` for every backend. ``None``
    for ``openai``: an external endpoint has nothing to deploy.
    """
    builder = _APP_BUILDERS.get(engine.backend)
    return builder(engine, model_path, deployment_name(model_path)) if builder else None


def make_client(engine: EngineConfig, app_name: str, deployment: str, timeout_s: float) -> EngineClient:
    """The client a Ray Data stage uses to reach ``engine`` (see the table in the module doc)."""
    if engine.backend == "openai":
        return OpenAIChatClient.from_env(engine.base_url or "", engine.model_name or "",
                                         timeout_s, engine.api_key_env, max_concurrency=engine.max_concurrency,
                                         requests_per_s=engine.requests_per_s)
    handle = serve.get_deployment_handle(deployment, app_name=app_name)
    if engine.request_mode == "row":
        return ServeRowClient(handle, timeout_s)
    return ServeBatchClient(handle, timeout_s)


def retry_policy(engine: EngineConfig) -> RetryPolicy:
    return RetryPolicy(max_retries=engine.max_retries, backoff_s=engine.retry_backoff_s)


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    """Poll until ``predicate()`` is true or fail with a message naming what was awaited."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


__all__ = ["EngineClient", "EngineError", "HFEngine", "HFGenerator", "build_engine_app", "call_with_retries",
           "deployment_name", "make_client", "model_fingerprint", "retry_policy", "wait_for"]
