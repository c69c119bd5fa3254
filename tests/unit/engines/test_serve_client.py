"""mmdc/engines/serve_client.py with a stand-in handle: a request per batch, failures per batch or row, timeouts."""

from __future__ import annotations

from ray import exceptions as rex

from mmdc.engines.protocol import call_with_retries
from mmdc.engines.serve_client import ServeBatchClient, ServeRowClient


class Response:
    def __init__(self, value=None, error: BaseException | None = None):
        self.value, self.error, self.cancelled = value, error, False

    def result(self, timeout_s=None):
        if self.error is not None:
            raise self.error
        return self.value

    def cancel(self):
        self.cancelled = True


class Method:
    def __init__(self, answer):
        self.answer, self.sent, self.responses = answer, [], []

    def remote(self, payload):
        self.sent.append(payload)
        self.responses.append(self.answer(payload, len(self.sent)))
        return self.responses[-1]


class Handle:
    def __init__(self, answer):
        self.generate_batch = Method(answer)
        self.generate = Method(answer)


def _reply(req):
    return {"text": f"a{req['seed']}", "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "stop"}


def test_a_batch_is_sent_as_one_request_and_the_replies_come_back_in_order():
    handle = Handle(lambda batch, n: Response([_reply(r) for r in batch]))
    reqs = [{"seed": i} for i in range(40)]
    out = ServeBatchClient(handle, 5.0).generate(reqs)
    assert [len(b) for b in handle.generate_batch.sent] == [40]
    assert [o["text"] for o in out] == [f"a{i}" for i in range(40)]


def test_a_dead_replica_fails_the_batch_and_the_retry_resends_its_rows():
    def answer(batch, n):  # the first request lands on a replica that dies
        return Response(error=rex.ActorDiedError()) if n == 1 else Response([_reply(r) for r in batch])

    handle = Handle(answer)
    reqs = [{"seed": i} for i in range(8)]
    out = call_with_retries(
        ServeBatchClient(handle, 5.0), reqs, [str(i) for i in range(8)], "teacher", sleep=lambda s: None
    )
    assert [o["text"] for o in out] == [f"a{i}" for i in range(8)]
    assert [[r["seed"] for r in b] for b in handle.generate_batch.sent] == [list(range(8))] * 2


def test_an_engine_that_fails_single_rows_gets_only_those_rows_again():
    # vllm's generate_batch returns a failed row as its exception inside the list
    def answer(batch, n):
        return Response([rex.ActorDiedError() if (n == 1 and r["seed"] == 2) else _reply(r) for r in batch])

    handle = Handle(answer)
    out = call_with_retries(
        ServeBatchClient(handle, 5.0), [{"seed": i} for i in range(4)], list("abcd"), "teacher", sleep=lambda s: None
    )
    assert [o["text"] for o in out] == [f"a{i}" for i in range(4)]
    assert [[r["seed"] for r in b] for b in handle.generate_batch.sent] == [[0, 1, 2, 3], [2]]


def test_a_timed_out_batch_is_cancelled_and_reported_for_every_row():
    handle = Handle(lambda batch, n: Response(error=rex.GetTimeoutError("late")))
    out = ServeBatchClient(handle, 5.0).generate([{"seed": i} for i in range(3)])
    assert all(isinstance(o, TimeoutError) for o in out) and handle.generate_batch.responses[0].cancelled


def test_a_timed_out_request_is_cancelled_and_reported_per_row():
    handle = Handle(
        lambda payload, n: Response(error=rex.GetTimeoutError("late")) if n == 2 else Response(_reply(payload))
    )
    out = ServeRowClient(handle, 5.0).generate([{"seed": i} for i in range(3)])
    assert isinstance(out[1], TimeoutError) and handle.generate.responses[1].cancelled
    assert out[0]["text"] == "a0" and out[2]["text"] == "a2"
