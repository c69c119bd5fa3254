"""mmdc/engines/openai.py against a real OpenAI-style HTTP server on 127.0.0.1 (stdlib http.server).

The server answers like a chat-completions endpoint and can be told to refuse (429, 5xx, 401) or
to be slow; the client + retry loop must still return every row exactly once, in order.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmdc.engines.openai import OpenAIChatClient, RateLimiter, chat_body, parse_chat_completion
from mmdc.engines.protocol import EngineError, RetryPolicy, call_with_retries


class FakeEndpoint:
    """A chat-completions server; ``plan(body, n)`` may return (status, headers, delay_s) to misbehave."""

    def __init__(self, plan=None):
        self.plan = plan or (lambda body, n: None)
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    n = len(endpoint.bodies)
                    endpoint.bodies.append(body)
                    endpoint.headers.append(dict(self.headers))
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    status, headers, delay = endpoint.plan(body, n) or (200, {}, 0.0)
                    time.sleep(delay)
                    if self.path != "/v1/chat/completions":
                        status = 404
                    if status == 200:
                        text = f"echo {body['seed']}"
                        payload = {
                            "id": "x",
                            "object": "chat.completion",
                            "model": body["model"],
                            "choices": [
                                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                            ],
                            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
                        }
                    else:
                        payload = {"error": {"message": f"refused with {status}", "type": "test"}}
                    data = json.dumps(payload).encode()
                finally:
                    # Before the reply leaves: the client may send its next request the moment it has read this
                    # one, and that request must not find this one still counted.
                    with endpoint.lock:
                        endpoint.in_flight -= 1
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint_factory():
    made = []

    def make(plan=None):
        made.append(FakeEndpoint(plan))
        return made[-1]

    yield make
    for e in made:
        e.close()


def _rows(n: int) -> tuple[list[dict], list[str]]:
    reqs = [
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": f"q{i}"}]}],
            "temperature": 0.5,
            "max_new_tokens": 12,
            "seed": i,
        }
        for i in range(n)
    ]
    return reqs, [f"id{i}" for i in range(n)]


def test_request_body_and_reply_translation():
    body = chat_body(
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, "max_new_tokens": 7, "seed": 2**64 + 5},
        "gpt-4o",
    )
    assert body == {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "n": 1,
        "stream": False,
        "temperature": 0.5,
        "max_tokens": 7,
        "seed": 5,
    }
    reply = parse_chat_completion(
        {
            "choices": [{"message": {"content": " ok "}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
    )
    assert reply == {"text": "ok", "prompt_tokens": 3, "completion_tokens": 1, "finish_reason": "length"}
    assert parse_chat_completion({"choices": [{"message": {"content": None}}]})["text"] == ""
    with pytest.raises(ValueError, match="without choices"):
        parse_chat_completion({"error": "nope"})


def test_rows_come_back_in_order_with_key_and_model(endpoint_factory, monkeypatch):
    ep = endpoint_factory()
    monkeypatch.setenv("MMDC_TEST_KEY", "sk-test")
    client = OpenAIChatClient.from_env(ep.base_url, "judge-model", 10.0, "MMDC_TEST_KEY", max_concurrency=4)
    reqs, ids = _rows(6)
    out = call_with_retries(client, reqs, ids, "referee", sleep=lambda s: None)
    assert [o["text"] for o in out] == [f"echo {i}" for i in range(6)]
    assert out[0]["completion_tokens"] == 2 and out[0]["prompt_tokens"] == 10
    assert {b["model"] for b in ep.bodies} == {"judge-model"}
    assert all(h["Authorization"] == "Bearer sk-test" for h in ep.headers)


def test_429_and_5xx_are_retried_honouring_retry_after(endpoint_factory):
    seen: dict[int, int] = {}

    def plan(body, n):  # row 1: one 429 with Retry-After; row 3: two 503s
        seen[body["seed"]] = seen.get(body["seed"], 0) + 1
        if body["seed"] == 1 and seen[1] == 1:
            return 429, {"Retry-After": "0.3"}, 0.0
        if body["seed"] == 3 and seen[3] <= 2:
            return 503, {}, 0.0

    ep = endpoint_factory(plan)
    client = OpenAIChatClient(ep.base_url, "m", 10.0, max_concurrency=2)
    reqs, ids = _rows(5)
    sleeps = []
    out = call_with_retries(client, reqs, ids, "teacher", RetryPolicy(backoff_s=0.01), sleep=sleeps.append)
    assert [o["text"] for o in out] == [f"echo {i}" for i in range(5)]
    seeds = [b["seed"] for b in ep.bodies]
    assert sorted(seeds) == [0, 1, 1, 2, 3, 3, 3, 4]  # only the refused rows went again
    assert sleeps == [0.3, 0.02]  # Retry-After (0.3 s) beat the 0.01 s backoff; then plain doubling


def test_client_errors_are_not_retried_and_carry_the_server_message(endpoint_factory):
    ep = endpoint_factory(lambda body, n: (401, {}, 0.0))
    client = OpenAIChatClient(ep.base_url, "m", 10.0)
    reqs, ids = _rows(2)
    with pytest.raises(
        EngineError, match=r"referee engine failed on 2 row\(s\) \[id0, id1\].*HTTP 401: refused with 401"
    ):
        call_with_retries(client, reqs, ids, "referee", sleep=lambda s: None)
    assert len(ep.bodies) == 2


def test_a_slow_endpoint_times_out_and_is_retried(endpoint_factory):
    ep = endpoint_factory(lambda body, n: (200, {}, 2.0) if n == 0 else None)
    client = OpenAIChatClient(ep.base_url, "m", timeout_s=0.3)
    reqs, ids = _rows(1)
    out = call_with_retries(client, reqs, ids, "teacher", RetryPolicy(backoff_s=0.0), sleep=lambda s: None)
    assert out[0]["text"] == "echo 0" and len(ep.bodies) == 2


def test_a_refused_connection_is_transient_then_fails_clearly():
    client = OpenAIChatClient("http://127.0.0.1:9/v1", "m", timeout_s=2.0)  # port 9: nothing listens
    reqs, ids = _rows(1)
    with pytest.raises(EngineError, match=r"teacher engine failed on 1 row\(s\) \[id0\] after 3 attempt"):
        call_with_retries(client, reqs, ids, "teacher", RetryPolicy(max_retries=2, backoff_s=0), sleep=lambda s: None)


def test_concurrency_is_capped_per_client(endpoint_factory):
    ep = endpoint_factory(lambda body, n: (200, {}, 0.05))
    client = OpenAIChatClient(ep.base_url, "m", 10.0, max_concurrency=3)
    reqs, ids = _rows(12)
    call_with_retries(client, reqs, ids, "teacher", sleep=lambda s: None)
    assert 1 <= ep.max_in_flight <= 3


def test_rate_limiter_spaces_starts_evenly():
    now = [100.0]
    waits = []

    def sleep(s):
        waits.append(round(s, 6))

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.acquire()  # all arrive at t=100: slots at 100, 100.25, 100.5
    assert waits == [0.25, 0.5]
    now[0] = 200.0  # long idle: no burst credit is banked beyond one slot
    limiter.acquire()
    assert waits == [0.25, 0.5]
    assert RateLimiter(None).interval == 0.0


def test_serving_side_translation_inverts_the_client_side():
    from mmdc.engines.openai import chat_completion_payload, request_from_chat_body

    ours = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, "max_new_tokens": 7, "seed": 11}
    assert request_from_chat_body(chat_body(ours, "m")) == ours
    reply = {"text": "hello", "prompt_tokens": 3, "completion_tokens": 1, "finish_reason": "stop"}
    payload = chat_completion_payload(reply, "m", "chatcmpl-1")
    assert parse_chat_completion(payload) == reply
    assert payload["usage"]["total_tokens"] == 4 and payload["model"] == "m"


@pytest.mark.parametrize(
    "body,field",
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": True}, "stream"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "'n'"),
    ],
)
def test_unanswerable_bodies_are_refused_naming_the_field(body, field):
    from mmdc.engines.openai import request_from_chat_body

    with pytest.raises(ValueError, match=field):
        request_from_chat_body(body)
