"""The vllm backend: an HF-format LLaVA checkpoint served by vLLM through ``ray.serve.llm``.

GPU only (compute capability >= 7.5), and optional: ``pip install "mmdc[vllm]"`` on a CUDA machine
(brings ``ray[llm]``, which pins a matching vLLM). Nothing here imports vLLM or ``ray.serve.llm``
until an app is built, so the rest of mmdc (and this module's config building, which is unit-tested)
works without them.

Shape of the app (one per engine, e.g. ``teacher``):

    VLLMChat (ingress, our protocol)  --handle-->  LLMServer (ray.serve.llm: vLLM, TP GPUs per replica)

``LLMServer`` comes from ``build_llm_deployment(LLMConfig(...))``; ``VLLMChat`` is a thin adapter
that answers the same ``generate_batch`` / ``generate`` calls as the hf engine, so the Ray Data
processors reach vLLM through a Serve handle exactly as they reach hf (no HTTP proxy, no port, the
driver's ``serve.run(app, route_prefix=None)`` unchanged). It turns each row into a
``ChatCompletionRequest`` and sends the rows of a batch concurrently: vLLM's continuous batching
wants many single requests in flight, not pre-formed batches. Images travel as data URLs, which
vLLM's chat API reads itself.

How to run it (8 x A100 80 GB, the LLaVA-1.5-13B teacher in bf16, as ``configs/paper-a100.yaml``
sets it; a V100 is refused, in one line, before vLLM starts: capability.py):

    pip install "mmdc[vllm]"
    python -m mmdc.run --config configs/paper-a100.yaml

The student stays on ``hf``: vLLM's LLaVA expects the llava-hf layout and projector, which the
paper's linear-projector student does not have (``mmdc/train/assembly.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mmdc.config import EngineConfig
from mmdc.engines.capability import accelerator_device, check_engine, node_device, replica_engine_key
from mmdc.engines.openai import chat_body, parse_chat_completion
from mmdc.engines.protocol import SHUTDOWN_WAIT_S, EngineHTTPError

log = logging.getLogger("mmdc.engines")

INSTALL_HINT = 'the vllm engine backend needs vLLM and ray[llm]: pip install "mmdc[vllm]" on a CUDA machine'


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
            "graceful_shutdown_wait_loop_s": SHUTDOWN_WAIT_S,
        },
    }
    if engine.accelerator_type:
        config["accelerator_type"] = engine.accelerator_type  # e.g. V100: schedule only on those nodes
    return config


def error_reply(reply: Any) -> EngineHTTPError | None:
    """The ``EngineHTTPError`` an error reply of ``LLMServer.chat`` stands for, or None for any other reply.

    Recognised by its shape, not by one class: vLLM's ``ErrorResponse`` (``error: ErrorInfo(message, type,
    code)``) is subclassed by ray.llm's internal ``ErrorResponse``, which the public
    ``ray.serve.llm.openai_api_models.ErrorResponse`` subclasses again, and ``LLMServer`` yields the internal
    one: an ``isinstance`` test against the public class misses every error. ``error.code`` is the HTTP
    status (500 where it is not a number), so 429 and 5xx are retried and other 4xx are not (protocol.py).
    """
    error = _field(reply, "error")
    shaped = isinstance(reply, dict) or any(c.__name__ == "ErrorResponse" for c in type(reply).__mro__)
    if error is None or not shaped:
        return None
    code, kind, message = _field(error, "code"), _field(error, "type"), _field(error, "message")
    status = int(code) if isinstance(code, int) or (isinstance(code, str) and code.isdigit()) else 500
    return EngineHTTPError(status, f"{kind}: {message}" if kind else str(message if message is not None else error))


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


class VLLMChat:
    """Ingress that speaks our protocol and forwards each row to ``LLMServer.chat`` (a Serve deployment
    once ``build_vllm_app`` wraps it; a plain class here so importing this module needs no Ray)."""

    def __init__(self, llm: Any, model_id: str):
        self.llm = llm.options(stream=True)  # LLMServer.chat is an async generator
        self.model_id = model_id

    def chat_request(self, body: dict) -> Any:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        return ChatCompletionRequest(**body)

    async def generate(self, request: dict) -> dict:
        body = self.chat_request(chat_body(request, self.model_id))
        async for reply in self.llm.chat.remote(body):  # non-streaming: one ChatCompletionResponse or ErrorResponse
            err = error_reply(reply)
            if err is not None:  # 4xx: the request's fault (not retried); 429, 5xx: retried
                raise err
            return parse_chat_completion(reply.model_dump())
        raise EngineHTTPError(502, "vLLM returned no reply")

    async def generate_batch(self, requests: list[dict]) -> list[dict | BaseException]:
        """All rows in flight at once; a failed row comes back as its exception, so only it is retried."""
        return list(await asyncio.gather(*(self.generate(r) for r in requests), return_exceptions=True))


def check_vllm_replica(engine_key: str, dtype: str) -> None:
    """In the vLLM replica, before vLLM starts: refuse (one line) a node GPU vLLM or ``dtype`` cannot run on.

    The replica holds no GPU of its own (its placement group's bundles hold them, on the same node), so
    the GPU kind is the node's Ray label: asking torch would open a CUDA context in the process vLLM
    starts from, holding memory on one of vLLM's GPUs.
    """
    device = node_device()
    if device is None:
        log.info("%s: the node's GPU kind is unknown to mmdc; vLLM starts unchecked", engine_key)
        return
    check_engine(engine_key, "vllm", dtype, device)


def checked_llm_server(engine_name: str | None, dtype: str) -> type:
    """``ray.serve.llm``'s ``LLMServer`` with ``check_vllm_replica`` run first in its constructor."""
    from ray.serve.llm.deployment import LLMServer

    class CheckedLLMServer(LLMServer):
        async def __init__(self, llm_config, **kwargs):
            check_vllm_replica(f"engines.{engine_name}" if engine_name else replica_engine_key(), dtype)
            await super().__init__(llm_config, **kwargs)

    return CheckedLLMServer


def build_vllm_app(engine: EngineConfig, model_path: str, name: str, engine_name: str | None = None):
    """``VLLMChat`` (named ``name``) over an ``LLMServer`` deployment built from ``vllm_llm_config``.

    With ``accelerator_type`` set, the GPU kind is known here, so a GPU vLLM or the dtype cannot run on is
    refused before anything is deployed; every replica checks its node again when it starts.
    ``engine_name`` is the engine's key under ``engines`` (default: the Serve app's name, in the replica).
    """
    import importlib.util

    gpu = accelerator_device(engine.accelerator_type) if engine.accelerator_type else None
    if gpu is not None:
        check_engine(f"engines.{engine_name or '<name>'}", "vllm", engine.dtype, gpu)
    if importlib.util.find_spec("vllm") is None:  # fail fast, before ray.serve.llm's heavy imports
        raise ImportError(f"{INSTALL_HINT} (vllm is not installed)")
    try:
        from ray.serve.llm import LLMConfig, build_llm_deployment
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    from ray import serve

    llm_config = LLMConfig(**vllm_llm_config(engine, model_path))
    llm = build_llm_deployment(
        llm_config, name_prefix=f"{name}-vllm:", deployment_cls=checked_llm_server(engine_name, engine.dtype)
    )
    ingress = serve.deployment(
        VLLMChat,
        name=name,
        num_replicas=engine.replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=8 * engine.max_batch_size * engine.replicas,
        graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_S,
    )
    return ingress.bind(llm, llm_config.model_id)
