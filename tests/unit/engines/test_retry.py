"""mmdc/engines/protocol.py: retries keep every row exactly once; errors name role and rows."""

from __future__ import annotations

import logging
import urllib.error

import pytest
from ray import exceptions as rex

from mmdc.engines.protocol import EngineError, EngineHTTPError, RetryPolicy, call_with_retries, is_retryable


def _reqs(n: int) -> tuple[list[dict], list[str]]:
    return [{"messages": [], "seed": i} for i in range(n)], [f"row{i}" for i in range(n)]


def _reply(req: dict) -> dict:
    return {"text": f"answer {req['seed']}", "prompt_tokens": 1, "completion_tokens": 2, "finish_reason": "stop"}


class ScriptedClient:
    """Fails the rows (by seed) named for each call number; records what every call carried."""

    def __init__(self, failures: list[dict[int, BaseException]], raise_whole: list[BaseException | None] | None = None):
        self.failures, self.raise_whole, self.calls = failures, raise_whole or [], []

    def generate(self, requests):
        n = len(self.calls)
        self.calls.append([r["seed"] for r in requests])
        if n < len(self.raise_whole) and self.raise_whole[n] is not None:
            raise self.raise_whole[n]
        fail = self.failures[n] if n < len(self.failures) else {}
        return [fail.get(r["seed"]) or _reply(r) for r in requests]


def test_no_failure_no_retry():
    reqs, ids = _reqs(5)
    sleeps = []
    out = call_with_retries(ScriptedClient([]), reqs, ids, "teacher", sleep=sleeps.append)
    assert [o["text"] for o in out] == [f"answer {i}" for i in range(5)] and sleeps == []


def test_whole_batch_lost_with_its_replica_is_resent_once_and_kept_in_order(caplog):
    reqs, ids = _reqs(4)
    client = ScriptedClient([], raise_whole=[rex.ActorDiedError()])
    sleeps = []
    with caplog.at_level(logging.WARNING, logger="mmdc.engines"):
        out = call_with_retries(client, reqs, ids, "teacher", RetryPolicy(backoff_s=0.5), sleep=sleeps.append)
    assert client.calls == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert [o["text"] for o in out] == [f"answer {i}" for i in range(4)]
    assert sleeps == [0.5]
    line = caplog.records[0].getMessage()
    assert "teacher engine error on 4 row(s) [row0, row1, row2, row3]" in line and "ActorDiedError" in line


def test_only_failed_rows_are_resent_and_each_row_appears_once():
    reqs, ids = _reqs(6)
    client = ScriptedClient(
        [{1: TimeoutError("slow"), 4: rex.ActorUnavailableError("gone", None)}, {4: EngineHTTPError(503, "busy")}]
    )
    sleeps = []
    out = call_with_retries(client, reqs, ids, "referee", RetryPolicy(backoff_s=1.0), sleep=sleeps.append)
    assert client.calls == [[0, 1, 2, 3, 4, 5], [1, 4], [4]]
    assert [o["text"] for o in out] == [f"answer {i}" for i in range(6)]
    assert sleeps == [1.0, 2.0]  # exponential backoff


def test_permanent_error_fails_at_once_naming_role_and_rows():
    reqs, ids = _reqs(3)
    client = ScriptedClient([{2: EngineHTTPError(400, "bad image")}])
    sleeps = []
    with pytest.raises(EngineError, match=r"augmentor engine failed on 1 row\(s\) \[row2\].*HTTP 400: bad image"):
        call_with_retries(client, reqs, ids, "augmentor", sleep=sleeps.append)
    assert sleeps == [] and len(client.calls) == 1


def test_retries_are_bounded_and_backoff_is_capped():
    reqs, ids = _reqs(2)
    died = rex.ActorDiedError()
    client = ScriptedClient([], raise_whole=[died] * 10)
    sleeps = []
    with pytest.raises(EngineError, match=r"student engine failed on 2 row\(s\) \[row0, row1\] after 4 attempt"):
        call_with_retries(
            client, reqs, ids, "student", RetryPolicy(max_retries=3, backoff_s=2, max_backoff_s=5), sleep=sleeps.append
        )
    assert sleeps == [2, 4, 5] and len(client.calls) == 4


def test_retry_after_from_the_server_wins_over_a_shorter_backoff():
    reqs, ids = _reqs(1)
    client = ScriptedClient([{0: EngineHTTPError(429, "slow down", retry_after_s=7.0)}])
    sleeps = []
    call_with_retries(client, reqs, ids, "teacher", RetryPolicy(backoff_s=1), sleep=sleeps.append)
    assert sleeps == [7.0]


def test_a_reply_count_mismatch_is_an_error_not_a_silent_shift():
    class Short:
        def generate(self, requests):
            return [_reply(r) for r in requests[:-1]]

    reqs, ids = _reqs(3)
    with pytest.raises(EngineError, match="2 replies for 3 requests"):
        call_with_retries(Short(), reqs, ids, "teacher", sleep=lambda s: None)


@pytest.mark.parametrize(
    "err, retry",
    [
        (rex.ActorDiedError(), True),
        (rex.ActorUnavailableError("restarting", None), True),
        (rex.GetTimeoutError("late"), True),
        (TimeoutError(), True),
        (ConnectionRefusedError(), True),
        (urllib.error.URLError("refused"), True),
        (EngineHTTPError(429, "x"), True),
        (EngineHTTPError(502, "x"), True),
        (EngineHTTPError(401, "x"), False),
        (ValueError("unsupported message part"), False),
    ],
)
def test_which_errors_are_transient(err, retry):
    assert is_retryable(err) is retry
