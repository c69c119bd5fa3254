"""mmdc/actors/backends/serve_client.py with a stand-in handle: chunking, per-chunk failures, cancel on timeout."""

from __future__ import annotations

from ray import exceptions as rex

from mmdc.actors.backends.protocol import call_with_retries
from mmdc.actors.backends.serve_client import ServeBatchClient, ServeRowClient


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


def test_a_batch_is_sent_as_engine_sized_chunks_all_in_flight():
    handle = Handle(lambda chunk, n: Response([_reply(r) for r in chunk]))
    reqs = [{"seed": i} for i in range(40)]
    out = ServeBatchClient(handle, 5.0, chunk_size=16).generate(reqs)
    assert [len(c) for c in handle.generate_batch.sent] == [16, 16, 8]
    assert [o["text"] for o in out] == [f"a{i}" for i in range(40)]


def test_a_dead_replica_fails_only_its_chunk_and_the_retry_resends_only_those_rows():
    def answer(chunk, n):  # the second chunk of the first round lands on a replica that dies
        return Response(error=rex.ActorDiedError()) if n == 2 else Response([_reply(r) for r in chunk])

    handle = Handle(answer)
    reqs = [{"seed": i} for i in range(8)]
    out = call_with_retries(ServeBatchClient(handle, 5.0, chunk_size=4), reqs, [str(i) for i in range(8)],
                            "teacher", sleep=lambda s: None)
    assert [o["text"] for o in out] == [f"a{i}" for i in range(8)]
    assert [[r["seed"] for r in c] for c in handle.generate_batch.sent] == [[0, 1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 7]]


def test_a_timed_out_request_is_cancelled_and_reported_per_row():
    handle = Handle(lambda payload, n: Response(error=rex.GetTimeoutError("late")) if n == 2 else Response(_reply(payload)))
    out = ServeRowClient(handle, 5.0).generate([{"seed": i} for i in range(3)])
    assert isinstance(out[1], TimeoutError) and handle.generate.responses[1].cancelled
    assert out[0]["text"] == "a0" and out[2]["text"] == "a2"
