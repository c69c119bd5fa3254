"""The openai backend: any OpenAI-compatible chat-completions endpoint, reached over HTTP.

Nothing is deployed: the Ray Data processor tasks POST ``{base_url}/chat/completions`` themselves
(stdlib ``urllib``, no SDK), e.g. for a GPT-4-class judge or a vLLM server someone else runs.
Each client keeps at most ``max_concurrency`` requests in flight and starts at most
``requests_per_s`` per second (both per client, one per processor task in flight: the endpoint sees
pipeline.concurrency times that). Errors come back per row; the processor retries 408/429/5xx, timeouts and refused
connections with backoff (honouring ``Retry-After``) and fails at once on other 4xx replies.

The API key is read from the environment variable named by ``api_key_env`` in the processor task's
worker process, so on a cluster pass it with the job (``ray job submit --runtime-env-json
'{"env_vars": {"OPENAI_API_KEY": "..."}}'``); an unset variable sends no Authorization header.

``chat_body`` / ``parse_chat_completion`` translate our protocol to OpenAI's and back; the vllm
backend uses the same pair.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mmdc.engines.protocol import EngineHTTPError, Outcome


def chat_body(request: dict, model: str) -> dict:
    """Our request -> an OpenAI chat-completions body (non-streaming, one choice)."""
    if "score_reply" in request:  # config.validate keeps likelihood scoring on hf; this keeps it from being ignored
        raise ValueError("score_reply (likelihood scoring) is served by the hf backend only, not by chat completions")
    body = {
        "model": model,
        "messages": request["messages"],
        "n": 1,
        "stream": False,
        "temperature": float(request.get("temperature", 0.0)),
        "max_tokens": int(request.get("max_new_tokens", 64)),
    }
    if request.get("seed") is not None:
        body["seed"] = int(request["seed"]) % 2**63  # OpenAI and vLLM take a signed 64-bit seed
    return body


def parse_chat_completion(payload: dict) -> dict:
    """An OpenAI chat-completions reply -> our response; a reply without a choice is an error."""
    choices = payload.get("choices") or []
    if not choices:
        raise ValueError(f"chat completion without choices: {json.dumps(payload)[:300]}")
    choice = choices[0]
    usage = payload.get("usage") or {}
    return {
        "text": ((choice.get("message") or {}).get("content") or "").strip(),
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "finish_reason": choice.get("finish_reason") or "stop",
    }


def request_from_chat_body(body: dict) -> dict:
    """An OpenAI chat-completions body -> our request: the inverse of ``chat_body`` (for serving our engines).

    Raises ValueError naming the field when the body cannot be answered (no messages, n > 1, streaming).
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    if body.get("stream"):
        raise ValueError("'stream': true is not supported")
    if int(body.get("n") or 1) != 1:
        raise ValueError("'n' must be 1")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 64))
    request = {
        "messages": messages,
        "temperature": float(body.get("temperature") or 0.0),
        "max_new_tokens": int(max_tokens),
    }
    if body.get("seed") is not None:
        request["seed"] = int(body["seed"])
    return request


def chat_completion_payload(response: dict, model: str, request_id: str) -> dict:
    """Our response -> an OpenAI chat-completions reply: the inverse of ``parse_chat_completion``."""
    prompt, completion = int(response.get("prompt_tokens") or 0), int(response.get("completion_tokens") or 0)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": response["text"]},
                "finish_reason": response.get("finish_reason") or "stop",
            }
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


class RateLimiter:
    """At most ``per_s`` starts per second, spaced evenly, shared by the threads of one client."""

    def __init__(
        self,
        per_s: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = time.sleep,
    ):
        self.interval = 1.0 / per_s if per_s else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Block until this caller's slot: one every ``interval`` seconds, in arrival order."""
        if not self.interval:
            return
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self.sleep(start - now)


class OpenAIChatClient:
    """POSTs one chat-completions request per row, up to ``max_concurrency`` at a time."""

    def __init__(
        self,
        base_url: str,
        model: str,
        timeout_s: float,
        api_key: str | None = None,
        max_concurrency: int = 8,
        requests_per_s: float | None = None,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout_s, self.api_key = model, timeout_s, api_key
        self.limiter = RateLimiter(requests_per_s)
        self.pool = ThreadPoolExecutor(max_workers=max(1, max_concurrency), thread_name_prefix="mmdc-http")

    @classmethod
    def from_env(cls, base_url: str, model: str, timeout_s: float, api_key_env: str | None, **kwargs):
        return cls(base_url, model, timeout_s, os.environ.get(api_key_env) if api_key_env else None, **kwargs)

    def generate(self, requests: list[dict]) -> list[Outcome]:
        futures = [self.pool.submit(self._post, r) for r in requests]
        return [f.exception() or f.result() for f in futures]

    def _post(self, request: dict) -> dict:
        self.limiter.acquire()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(chat_body(request, self.model)).encode()
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                payload = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raise EngineHTTPError(err.code, _error_text(err), _retry_after(err.headers.get("Retry-After"))) from None
        return parse_chat_completion(payload)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _error_text(err: urllib.error.HTTPError) -> str:
    """The endpoint's own error message when it sent one (OpenAI: {"error": {"message": ...}})."""
    try:
        raw = err.read().decode(errors="replace")
    except Exception:  # noqa: BLE001 - the body is a nicety
        return str(err.reason)
    try:
        error = json.loads(raw).get("error")
        return str(error.get("message") if isinstance(error, dict) else error or raw)[:500]
    except (ValueError, AttributeError):
        return raw[:500] or str(err.reason)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return None
