"""mmdc/engines/vllm.py: error replies of ``LLMServer.chat`` become ``EngineHTTPError``s that the retry rules of
protocol.py judge by status (429 / 5xx retried, other 4xx not), whichever class of the ``ErrorResponse`` family
the engine yields.

ray.llm 2.60's ``LLMServer`` yields ``ray.llm._internal.serve.core.configs.openai_api_models.ErrorResponse``, a
subclass of vLLM's ``ErrorResponse`` and the parent of the public ``ray.serve.llm.openai_api_models.ErrorResponse``,
so testing replies against the public class missed every error. Where ``ray.serve.llm`` imports (it needs vLLM)
the real classes are used; everywhere, a stand-in family with the same fields and names is.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from pydantic import BaseModel

from mmdc.engines.protocol import EngineError, EngineHTTPError, RetryPolicy, call_with_retries, is_retryable
from mmdc.engines.vllm import VLLMChat, error_reply


class ErrorInfo(BaseModel):  # vllm.entrypoints.serve.engine.protocol.ErrorInfo
    message: str
    type: str
    param: str | None = None
    code: int


class VLLMErrorResponse(BaseModel):  # vLLM's ErrorResponse
    error: ErrorInfo


VLLMErrorResponse.__name__ = "ErrorResponse"


class InternalErrorResponse(VLLMErrorResponse):  # ray.llm._internal...openai_api_models.ErrorResponse: what is yielded
    pass


InternalErrorResponse.__name__ = "ErrorResponse"


class PublicErrorResponse(InternalErrorResponse):  # ray.serve.llm.openai_api_models.ErrorResponse
    pass


PublicErrorResponse.__name__ = "ErrorResponse"

COMPLETION = {
    "id": "x",
    "object": "chat.completion",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "a red circle"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
}


def _error(cls, code: int, message: str = "boom", kind: str = "InternalServerError"):
    return cls(error=ErrorInfo(message=message, type=kind, code=code))


@pytest.mark.parametrize("cls", [VLLMErrorResponse, InternalErrorResponse, PublicErrorResponse])
@pytest.mark.parametrize("code, retried", [(500, True), (503, True), (429, True), (400, False), (404, False)])
def test_every_error_response_class_is_an_http_error_retried_by_status(cls, code, retried):
    err = error_reply(_error(cls, code, kind="BadRequestError" if code == 400 else "InternalServerError"))
    assert isinstance(err, EngineHTTPError) and err.status == code
    assert is_retryable(err) is retried


def test_the_yielded_class_is_not_an_instance_of_the_public_one():
    """The bug this fixes: the engine's class is the public one's parent, so isinstance(reply, public) is False."""
    reply = _error(InternalErrorResponse, 503)
    assert not isinstance(reply, PublicErrorResponse)
    assert error_reply(reply).status == 503


def test_replies_that_are_not_errors_pass_and_odd_codes_are_server_errors():
    assert error_reply(SimpleNamespace(model_dump=lambda: COMPLETION)) is None
    assert error_reply(SimpleNamespace(error=None)) is None
    assert error_reply(SimpleNamespace(error=ErrorInfo(message="m", type="t", code=400))) is None  # not that shape
    assert error_reply({"error": {"message": "overloaded", "type": "ServiceUnavailable", "code": "503"}}).status == 503
    odd = error_reply({"error": {"message": "context_length_exceeded", "code": "context_length_exceeded"}})
    assert odd.status == 500 and "context_length_exceeded" in str(odd)
    assert str(error_reply(_error(InternalErrorResponse, 400, "bad image", "BadRequestError"))) == (
        "HTTP 400: BadRequestError: bad image"
    )


class FakeLLMServer:
    """A Serve handle to ``LLMServer`` whose ``chat`` yields the replies it is given, one per call, in order."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.chat = SimpleNamespace(remote=self._chat)

    def options(self, **kwargs):
        assert kwargs == {"stream": True}
        return self

    async def _chat(self, body):
        reply = self.replies.pop(0)
        yield reply


class StubChat(VLLMChat):
    def chat_request(self, body: dict) -> dict:  # ChatCompletionRequest needs vLLM
        return body


class Client:
    """What a processor's Serve client does with ``VLLMChat.generate_batch``: one call per attempt."""

    def __init__(self, chat):
        self.chat = chat

    def generate(self, requests):
        return asyncio.run(self.chat.generate_batch(requests))


REQUEST = {"messages": [{"role": "user", "content": "what colour?"}], "temperature": 0.5, "seed": 1}


def test_a_5xx_reply_is_retried_and_the_row_answered():
    ok = SimpleNamespace(model_dump=lambda: COMPLETION)
    chat = StubChat(FakeLLMServer([_error(InternalErrorResponse, 503), ok]), "m")
    out = call_with_retries(Client(chat), [REQUEST], ["row1"], "teacher", RetryPolicy(backoff_s=0), sleep=lambda s: 0)
    assert out[0]["text"] == "a red circle" and out[0]["completion_tokens"] == 3


def test_a_4xx_reply_fails_at_once_naming_the_row_and_the_cause():
    bad = _error(InternalErrorResponse, 400, "image too large", "BadRequestError")
    chat = StubChat(FakeLLMServer([bad]), "m")
    with pytest.raises(EngineError) as failed:
        call_with_retries(Client(chat), [REQUEST], ["row1"], "teacher", RetryPolicy(backoff_s=0), sleep=lambda s: 0)
    assert failed.value.attempts == 1
    assert "[row1] after 1 attempt(s): EngineHTTPError: HTTP 400: BadRequestError: image too large" in str(failed.value)


def test_the_real_class_hierarchy_where_ray_serve_llm_imports():
    try:
        from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo as RealInfo
        from ray.llm._internal.serve.core.configs.openai_api_models import ErrorResponse as Internal
        from ray.serve.llm.openai_api_models import ErrorResponse as Public
    except ImportError as err:
        pytest.skip(f"ray.serve.llm does not import here (it needs vLLM, whose wheels do not run on CPU): {err}")
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse as VLLMError

    assert issubclass(Public, Internal) and issubclass(Internal, VLLMError)
    for cls in (VLLMError, Internal, Public):
        for code, retried in ((503, True), (400, False)):
            err = error_reply(cls(error=RealInfo(message="m", type="t", code=code)))
            assert err is not None and err.status == code and is_retryable(err) is retried
    assert not isinstance(Internal(error=RealInfo(message="m", type="t", code=500)), Public)
