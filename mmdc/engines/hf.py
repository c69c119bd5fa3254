"""The hf backend: transformers ``generate`` over a LLaVA-family checkpoint, in a Serve deployment.

Works on CPU and GPU (fp16 on V100; SDPA attention, or xformers on GPUs where a test call of it
succeeds: see attention.py). A replica checks its device before it loads the model and refuses, in
one line naming the key to change, a dtype or kernel the device cannot run (capability.py).
``HFEngine`` answers two request shapes:

- ``generate_batch(requests)``: one Serve call per Ray Data batch (``request_mode: batch``, the
  default), split here into forward batches of ``max_batch_size`` rows. On 2 cores one call per
  batch is several times faster than one call per row: a tiny model's forward pass is cheaper
  than a Serve round trip (benchmarks/results/engine_throughput.md).
- ``generate(request)``: one Serve call per row, grouped on the replica by ``@serve.batch``
  (``request_mode: row``), so rows from many clients share a forward pass. Right when requests
  arrive one at a time from many callers, or when rows differ a lot in length.

A request with ``score_reply`` is scored, not generated (protocol.py): the log-likelihood of that
reply after the prompt, from one teacher-forced forward pass (``HFGenerator._score_chunk``).

Sampling is reproducible per row and independent of how rows are batched: each row draws its
own Gumbel noise from a generator seeded by the request's ``seed`` and decoding takes the
argmax of ``logits / T + gumbel``, which is an exact sample from ``softmax(logits / T)``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from ray import serve

from mmdc.config import EngineConfig
from mmdc.engines.protocol import SHUTDOWN_WAIT_S

log = logging.getLogger("mmdc.engines")


class _PerRowGumbel:
    """LogitsProcessor: add per-row Gumbel noise scaled for temperature; greedy argmax then samples.

    scores: [batch, vocab]. Row i uses its own generator, so its tokens do not depend on which
    other rows share the batch.
    """

    def __init__(self, seeds: list[int], temperatures: list[float]):
        import torch

        self.generators = [torch.Generator().manual_seed(int(s) % (2**63)) for s in seeds]
        self.temperatures = temperatures

    def __call__(self, input_ids, scores):
        import torch

        out = scores.float().clone()
        vocab = scores.shape[-1]
        for i, (gen, temp) in enumerate(zip(self.generators, self.temperatures)):
            if temp <= 0:
                continue  # greedy row
            u = torch.rand(vocab, generator=gen).clamp_(1e-20, 1.0 - 1e-7)
            gumbel = -torch.log(-torch.log(u))  # [vocab]
            out[i] = out[i] / temp + gumbel.to(out.device)
        return out


def _to_hf_messages(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """OpenAI content parts -> HF chat-template parts, pulling the images out in order."""
    from mmdc.data.images import from_data_url

    converted, images = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            converted.append({"role": message["role"], "content": [{"type": "text", "text": content}]})
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "image"):
                url = part["image_url"]["url"] if kind == "image_url" else part.get("url") or part.get("image")
                images.append(from_data_url(url))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"unsupported message part type {kind!r}")
        converted.append({"role": message["role"], "content": parts})
    return converted, images


def _checkpoint_dtype(config):
    """The dtype ``dtype: auto`` loads a checkpoint in: its config's (else its language model's)."""
    import torch

    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if value is not None:
            return value if isinstance(value, torch.dtype) else getattr(torch, str(value).removeprefix("torch."))
    return torch.float32


def _head_dims(config) -> set[int]:
    """Attention head sizes of the language model and the vision tower: what the attention test call runs at."""
    dims = set()
    for cfg in (getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if cfg is not None and getattr(cfg, "num_attention_heads", None):
            dims.add(int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads))
    return dims or {64}


class HFGenerator:
    """transformers ``generate`` over a LLaVA-family checkpoint, batched, reproducible per row.

    Plain class (no Ray) so a single process can use it too: the benchmarks compare it with
    the Serve path, and the engine deployment below wraps it.
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "float32",
        device: str | None = None,
        max_batch_size: int = 16,
        attention: str = "auto",
        engine_key: str = "engine",
    ):
        """``engine_key`` (``engines.<name>``) names the config keys in a refusal (capability.py): the
        device is checked for the dtype, and the attention kernel tried on it, before the model loads."""
        import torch
        from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

        from mmdc.engines.attention import resolve_attention
        from mmdc.engines.capability import check_engine, current_device

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = AutoConfig.from_pretrained(model_path)
        run_dtype = _checkpoint_dtype(config) if dtype == "auto" else getattr(torch, dtype)
        gpu = current_device(self.device)
        check_engine(engine_key, "hf", str(run_dtype).removeprefix("torch."), gpu)
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batched generation
        self.attention = resolve_attention(attention, self.device, run_dtype, _head_dims(config), engine_key, gpu)
        self.model = LlavaForConditionalGeneration.from_pretrained(
            model_path, dtype="auto" if dtype == "auto" else run_dtype, attn_implementation=self.attention
        )
        self.model.to(self.device).eval()
        self.max_batch_size = max_batch_size
        self.model_path = model_path
        # One forward batch at a time: a replica then uses the CPU/GPU share it asked for, and the fast
        # tokenizer (not safe to call from two threads at once) is never shared. Serve runs concurrent
        # sync requests in a thread pool, so without this two batches would interleave on one model.
        self._lock = threading.Lock()

    def generate(self, requests: list[dict]) -> list[dict]:
        """Answer every request; rows are chunked to ``max_batch_size`` and grouped by kind and image presence.

        A request with ``score_reply`` is not generated: it gets the log-likelihood of that text as the
        assistant's reply (protocol.py), one teacher-forced forward pass.
        """
        results: list[dict | None] = [None] * len(requests)
        prepared = []
        for i, req in enumerate(requests):
            msgs, images = _to_hf_messages(req["messages"])
            prompt = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            reply = None
            if "score_reply" in req:  # the template's own rendering of the reply turn, after the prompt
                reply = self._reply_suffix(msgs, prompt, req["score_reply"])
            prepared.append((i, prompt, images, reply))
        for scoring in (False, True):
            for has_images in (True, False):
                group = [p for p in prepared if (p[3] is not None) == scoring and bool(p[2]) == has_images]
                for start in range(0, len(group), self.max_batch_size):
                    chunk = group[start : start + self.max_batch_size]
                    with self._lock:  # decoding images and templating above may overlap another batch
                        outs = (
                            self._score_chunk(chunk)
                            if scoring
                            else self._generate_chunk(chunk, [requests[p[0]] for p in chunk])
                        )
                    for p, out in zip(chunk, outs):
                        results[p[0]] = out
        return results  # type: ignore[return-value]

    def _reply_suffix(self, msgs: list[dict], prompt: str, reply: str) -> str:
        """The text the chat template adds after the generation prompt for an assistant ``reply`` (and stop token)."""
        if not isinstance(reply, str):
            raise ValueError(f"score_reply must be text, got {type(reply).__name__}")
        turn = {"role": "assistant", "content": [{"type": "text", "text": reply}]}
        full = self.processor.apply_chat_template(msgs + [turn], add_generation_prompt=False, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                "the chat template does not render the reply turn after its generation prompt; "
                "score_reply needs a template that does"
            )
        return full[len(prompt) :]

    def _score_chunk(self, chunk) -> list[dict]:
        """Sum of log-probabilities of each row's reply tokens given its prompt (right-padded, one forward pass)."""
        import torch

        tok = self.processor.tokenizer
        prompts = [p for _, p, _, _ in chunk]
        images = [img for _, _, imgs, _ in chunk for img in imgs] or None
        enc = self.processor(text=prompts, images=images, return_tensors="pt", padding=True)
        rows, spans = [], []
        for r, (_, _, _, reply) in enumerate(chunk):
            prompt_ids = enc["input_ids"][r][enc["attention_mask"][r].bool()].tolist()  # image tokens expanded
            reply_ids = tok(reply, add_special_tokens=False)["input_ids"]
            rows.append(prompt_ids + reply_ids)
            spans.append((len(prompt_ids), len(reply_ids)))
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(rows):  # right padding: positions start at 0 in every row, as when generating
            input_ids[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        if "pixel_values" in enc:
            inputs["pixel_values"] = enc["pixel_values"].to(self.device, self.model.dtype)
        with torch.inference_mode():
            logits = self.model(**inputs).logits  # [batch, width, vocab]
        results = []
        for r, (start, n) in enumerate(spans):
            logp = torch.log_softmax(logits[r, start - 1 : start + n - 1].float(), dim=-1)  # predicts the reply
            target = input_ids[r, start : start + n].to(logp.device)
            total = float(logp.gather(-1, target.unsqueeze(-1)).sum()) if n else 0.0
            results.append(
                {
                    "text": "",
                    "logprob": total,
                    "scored_tokens": n,
                    "prompt_tokens": start,
                    "completion_tokens": 0,
                    "finish_reason": "score",
                }
            )
        return results

    def _generate_chunk(self, chunk, reqs) -> list[dict]:
        import torch
        from transformers import LogitsProcessorList

        prompts = [p for _, p, _, _ in chunk]
        images = [img for _, _, imgs, _ in chunk for img in imgs] or None
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        max_new = max(int(r.get("max_new_tokens", 64)) for r in reqs)
        sampler = _PerRowGumbel([int(r.get("seed", 0)) for r in reqs], [float(r.get("temperature", 0.0)) for r in reqs])
        tok = self.processor.tokenizer
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new,
                logits_processor=LogitsProcessorList([sampler]),
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        prompt_len = inputs["input_ids"].shape[1]
        new_tokens = out[:, prompt_len:]  # [batch, new]
        results = []
        for row, req in enumerate(reqs):
            ids = new_tokens[row].tolist()
            limit = int(req.get("max_new_tokens", 64))
            finish = "length"
            if tok.eos_token_id in ids[:limit]:
                ids = ids[: ids.index(tok.eos_token_id)]
                finish = "stop"
            ids = ids[:limit]
            ids = [t for t in ids if t != tok.pad_token_id]
            results.append(
                {
                    "text": tok.decode(ids, skip_special_tokens=True).strip(),
                    "prompt_tokens": int(inputs["attention_mask"][row].sum()),
                    "completion_tokens": len(ids),
                    "finish_reason": finish,
                }
            )
        return results


@serve.deployment(max_ongoing_requests=1)  # build_hf_app sets it per request mode
class HFEngine:
    """Serve deployment over ``HFGenerator``: a whole batch per call, or one row per call batched by Serve."""

    def __init__(
        self,
        model_path: str,
        dtype: str,
        max_batch_size: int,
        num_threads: int,
        batch_wait_timeout_s: float = 0.05,
        attention: str = "auto",
        engine_key: str | None = None,
    ):
        """``engine_key``: ``engines.<name>`` for refusals (default: ``engines.<this Serve app's name>``)."""
        import torch

        from mmdc.engines.capability import replica_engine_key

        torch.set_num_threads(max(1, num_threads))
        key = engine_key or replica_engine_key()
        self.generator = HFGenerator(
            model_path, dtype=dtype, max_batch_size=max_batch_size, attention=attention, engine_key=key
        )
        self.model_path = model_path
        self.answered = 0  # rows this replica has answered (info(): progress, and which replica did the work)
        # @serve.batch takes its limits at decoration time; the engine config sets them per deployment.
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("engine ready: %s (attention: %s)", model_path, self.generator.attention)

    def generate_batch(self, requests: list[dict]) -> list[dict]:
        """``request_mode: batch``: the caller already grouped the rows."""
        out = self.generator.generate(requests)
        self.answered += len(out)
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def generate(self, requests: list[dict]) -> list[dict]:
        """``request_mode: row``: one request per call; Serve hands us up to max_batch_size of them at once.

        The forward pass runs in a worker thread so the replica's event loop keeps accepting
        requests (and forming the next batch) meanwhile.
        """
        out = await asyncio.get_running_loop().run_in_executor(None, self.generator.generate, requests)
        self.answered += len(out)
        return out

    async def __call__(self, http_request: Any) -> Any:
        """``POST <route_prefix>/chat/completions``, OpenAI-style: the engine as an HTTP endpoint.

        Only reachable when the app is deployed with a route and Serve's proxy on (``python -m
        mmdc.endpoint``); the run itself calls ``generate_batch`` / ``generate`` through handles.
        """
        import uuid

        from starlette.responses import JSONResponse

        from mmdc.engines.openai import chat_completion_payload, request_from_chat_body

        if http_request.method != "POST" or not http_request.url.path.rstrip("/").endswith("/chat/completions"):
            return JSONResponse(
                {"error": {"message": "this endpoint serves POST .../chat/completions only"}}, status_code=404
            )
        try:
            body = await http_request.json()
            request = request_from_chat_body(body)
        except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
            return JSONResponse({"error": {"message": f"bad request: {err}"}}, status_code=400)
        try:
            out = await self.generate(request)  # @serve.batch: concurrent HTTP requests share a forward pass
        except ValueError as err:  # e.g. an image data URL that does not decode
            return JSONResponse({"error": {"message": str(err)}}, status_code=400)
        return JSONResponse(
            chat_completion_payload(out, body.get("model") or self.model_path, f"chatcmpl-{uuid.uuid4().hex}")
        )

    def info(self) -> dict:
        """What this replica serves, and which actor it is (tests and operators kill or inspect it by name)."""
        import ray

        from mmdc.data.answers import model_fingerprint

        ctx = ray.get_runtime_context()
        return {
            "model_path": self.model_path,
            "fingerprint": model_fingerprint(self.model_path),
            "actor_name": ctx.get_actor_name(),
            "actor_id": ctx.get_actor_id(),
            "answered": self.answered,
        }


def build_hf_app(engine: EngineConfig, model_path: str, name: str, engine_name: str | None = None) -> serve.Application:
    """Serve application for an hf engine: ``engine.replicas`` replicas, each on its CPUs/GPUs.

    ``engine_name`` (its key under ``engines``) names the keys in a replica's refusal; default: the app's name.

    Batch mode: one request at a time per replica (``max_ongoing_requests=1``). A request is a
    whole Ray Data batch, long next to the turnaround between two batches, and Serve's router can
    then only send a request to a free replica; keep at least as many clients as replicas, or
    some replicas idle (``config.validate`` warns). With more room, the callers' routers (one per
    client process, each with its own stale view of the queues) now and then sent two clients'
    batches to one replica while the other idled: on 2 cores a 2,000-row phase took 5.06 s that
    way against 4.47 s with one at a time, median of 5 alternating phases
    (benchmarks/results/request_routing.md). Row mode needs room for a batch being formed while
    one runs: max_ongoing_requests is twice the batch size there.
    """
    threads = max(1, int(engine.num_cpus))
    actor_options = {
        "num_cpus": engine.num_cpus,
        "num_gpus": engine.num_gpus,
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}},
    }
    ongoing = 2 * engine.max_batch_size if engine.request_mode == "row" else 1
    return HFEngine.options(
        name=name,
        num_replicas=engine.replicas,
        max_ongoing_requests=ongoing,
        ray_actor_options=actor_options,
        graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_S,
    ).bind(
        model_path,
        engine.dtype,
        engine.max_batch_size,
        threads,
        engine.batch_wait_timeout_s,
        engine.attention,
        f"engines.{engine_name}" if engine_name else None,
    )
