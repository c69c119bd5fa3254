"""The vllm backend: an HF-format LLaVA checkpoint served by vLLM through ``ray.serve.llm``.

GPU only, and optional: ``pip install "mmdc[gpu]"`` on a CUDA machine (brings ``ray[llm]``, which
pins a matching vLLM). Nothing here imports vLLM or ``ray.serve.llm`` until an app is built, so the
rest of mmdc (and this module's config building, which is unit-tested) works without them.

Shape of the app (one per engine, e.g. ``teacher``):

    VLLMChat (ingress, our protocol)  --handle-->  LLMServer (ray.serve.llm: vLLM, TP GPUs per replica)

``LLMServer`` comes from ``build_llm_deployment(LLMConfig(...))``; ``VLLMChat`` is a thin adapter
that answers the same ``generate_batch`` / ``generate`` calls as the hf engine, so the Ray Data
processors reach vLLM through a Serve handle exactly as they reach hf (no HTTP proxy, no port, the
driver's ``serve.run(app, route_prefix=None)`` unchanged). It turns each row into a
``ChatCompletionRequest`` and sends the rows of a batch concurrently: vLLM's continuous batching
wants many single requests in flight, not pre-formed batches. Images travel as data URLs, which
vLLM's chat API reads itself.

How to run it (6 x V100 32 GB, LLaVA-1.5-13B teacher in fp16 on 2 GPUs per replica, as
``configs/paper.yaml`` sets it):

    pip install "mmdc[gpu]"
    python -m mmdc.run --config configs/paper.yaml

The student stays on ``hf``: vLLM's LLaVA expects the llava-hf layout and projector, which the
paper's linear-projector student does not have (``mmdc/train/assembly.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from mmdc.config import EngineConfig
from mmdc.engines.openai import chat_body, parse_chat_completion
from mmdc.engines.protocol import EngineHTTPError

INSTALL_HINT = 'the vllm engine backend needs vLLM and ray[llm]: pip install "mmdc[gpu]" on a CUDA machine'


def vllm_llm_config(engine: EngineConfig, model_path: str) -> dict[str, Any]:
    """Keyword arguments of ``ray.serve.llm.LLMConfig`` for one engine (pure: no vLLM, no Ray).

    ``model_id`` is the name requests carry (``engine.model_name`` or the model path);
    ``model_source`` is what vLLM loads (a hub id or a local HF folder on shared storage).
    """
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": engine.tensor_parallel_size,
        "dtype": engine.dtype,  # float16 on V100 (no bf16 there)
        "max_model_len": engine.max_model_len,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "max_num_seqs": engine.max_batch_size,  # sequences vLLM batches together per replica
        "limit_mm_per_prompt": {"image": 1},  # every role sends one image per request
    }
    engine_kwargs.update(engine.engine_kwargs)  # the escape hatch wins (e.g. enforce_eager: true)
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": engine.model_name or model_path, "model_source": model_path},
        "engine_kwargs": engine_kwargs,
        "deployment_config": {
            "num_replicas": engine.replicas,
            "max_ongoing_requests": 4 * engine.max_batch_size,
            "ray_actor_options": {"num_cpus": engine.num_cpus},
        },
    }
    if engine.accelerator_type:
        config["accelerator_type"] = engine.accelerator_type  # e.g. V100: schedule only on those nodes
    return config


class VLLMChat:
    """Ingress that speaks our protocol and forwards each row to ``LLMServer.chat`` (a Serve deployment
    once ``build_vllm_app`` wraps it; a plain class here so importing this module needs no Ray)."""

    def __init__(self, llm: Any, model_id: str):
        self.llm = llm.options(stream=True)  # LLMServer.chat is an async generator
        self.model_id = model_id

    async def generate(self, request: dict) -> dict:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, ErrorResponse

        body = ChatCompletionRequest(**chat_body(request, self.model_id))
        async for reply in self.llm.chat.remote(body):  # non-streaming: one ChatCompletionResponse
            if isinstance(reply, ErrorResponse):  # 4xx: the request's fault (not retried); 5xx: retried
                raise EngineHTTPError(int(reply.error.code or 500), str(reply.error.message))
            return parse_chat_completion(reply.model_dump())
        raise EngineHTTPError(502, "vLLM returned no reply")

    async def generate_batch(self, requests: list[dict]) -> list[dict | BaseException]:
        """All rows in flight at once; a failed row comes back as its exception, so only it is retried."""
        return list(await asyncio.gather(*(self.generate(r) for r in requests), return_exceptions=True))


def build_vllm_app(engine: EngineConfig, model_path: str, name: str):
    """``VLLMChat`` (named ``name``) over an ``LLMServer`` deployment built from ``vllm_llm_config``."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # fail fast, before ray.serve.llm's heavy imports
        raise ImportError(f"{INSTALL_HINT} (vllm is not installed)")
    try:
        from ray.serve.llm import LLMConfig, build_llm_deployment
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    from ray import serve

    llm_config = LLMConfig(**vllm_llm_config(engine, model_path))
    llm = build_llm_deployment(llm_config, name_prefix=f"{name}-vllm:")
    ingress = serve.deployment(
        VLLMChat,
        name=name,
        num_replicas=engine.replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=8 * engine.max_batch_size * engine.replicas,
    )
    return ingress.bind(llm, llm_config.model_id)
