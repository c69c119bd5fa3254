"""The one request protocol every engine speaks, and the retry loop that keeps a phase whole.

    request  = {"messages": [...OpenAI chat messages, images as data: URLs...],
                "temperature": 0.5, "max_new_tokens": 64, "seed": 1234}
    response = {"text": "...", "prompt_tokens": 250, "completion_tokens": 12, "finish_reason": "stop"}

A request with ``"score_reply": "text"`` is scored instead of answered (hf backend only; the
likelihood referee, ``calibration.referee_scoring``): the reply gets the log-likelihood of that
text as the assistant's turn after ``messages``, stop token included,

    response = {"text": "", "logprob": -3.2, "scored_tokens": 6, "prompt_tokens": 250,
                "completion_tokens": 0, "finish_reason": "score"}

A client (``EngineClient``) takes a list of requests and returns one *outcome* per request, in
order: the response dict, or the exception that request ended with. Returning exceptions instead
of raising lets a per-row backend (vLLM, an OpenAI endpoint, hf in row mode) retry only the rows
that failed; a per-batch backend (hf in batch mode) simply fails every row of the batch together.

``call_with_retries`` is what a Ray Data processor runs: it retries the rows whose error is transient
(a replica that died, a timeout, HTTP 429/5xx) with exponential backoff, so a phase output holds
every input row exactly once; a permanent error, or a transient one that outlives the retries,
raises ``EngineError`` naming the role and the rows. Every failed attempt is logged the same way.
Sampling seeds do not change between retries, so a retried row gets the answer it would have got.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("mmdc.engines")
# Serve's wait before stopping a deleted replica (its default loop is 2 s). The driver deletes an engine only once
# its phase's requests are answered, so there is nothing to drain: one short look instead.
SHUTDOWN_WAIT_S = 0.1

Outcome = dict | BaseException  # a response, or the error this request ended with


class EngineClient(Protocol):
    """How a processor reaches an engine: ``generate`` never raises for a backend error, it returns it."""

    def generate(self, requests: list[dict]) -> list[Outcome]: ...


class EngineError(RuntimeError):
    """A request that failed for good: the message names the role, the rows and the last cause."""

    def __init__(self, role: str, ids: Sequence[str], cause: BaseException | str, attempts: int):
        self.role, self.ids, self.attempts = role, list(ids), attempts
        self.reason = _describe(cause)
        super().__init__(
            f"{role} engine failed on {len(self.ids)} row(s) [{_id_list(self.ids)}] "
            f"after {attempts} attempt(s): {self.reason}"
        )

    def __reduce__(self):  # rebuilt from its fields when it crosses Ray (the cause as text: it may not pickle)
        return type(self), (self.role, self.ids, self.reason, self.attempts)


class EngineHTTPError(Exception):
    """An HTTP error reply from an OpenAI-compatible endpoint; 408/429/5xx are worth retrying."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None):
        self.status, self.message, self.retry_after_s = status, message, retry_after_s
        super().__init__(f"HTTP {status}: {message}")

    def __reduce__(self):  # rebuilt from its fields when it crosses Ray
        return type(self), (self.status, self.message, self.retry_after_s)

    @property
    def retryable(self) -> bool:
        return self.status in (408, 425, 429) or self.status >= 500


def is_retryable(err: BaseException) -> bool:
    """Transient failures: the engine (or the way to it) went away or was slow, not the request's fault."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    if isinstance(err, EngineHTTPError):
        return err.retryable
    if isinstance(err, rex.RayTaskError):  # an error raised inside the replica: judge its cause
        cause = getattr(err, "cause", None)
        return cause is not None and cause is not err and is_retryable(cause)
    transient = (
        TimeoutError,
        ConnectionError,  # incl. Ray's GetTimeoutError, socket timeouts, refused/reset
        rex.RayActorError,  # ActorDiedError, ActorUnavailableError: the replica died or is restarting
        rex.WorkerCrashedError,
        rex.NodeDiedError,
        rex.ObjectLostError,
        rex.TaskCancelledError,
        sex.BackPressureError,
        sex.ReplicaUnavailableError,
    )
    if isinstance(err, transient):
        return True
    import urllib.error

    return isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff (doubling from ``backoff_s``, capped at ``max_backoff_s``)."""

    max_retries: int = 4  # extra attempts for the rows of a failed request
    backoff_s: float = 1.0  # wait before the first retry
    max_backoff_s: float = 60.0  # cap on one wait

    def delay(self, retry: int, hint_s: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based); a server's Retry-After wins if longer."""
        return max(min(self.max_backoff_s, self.backoff_s * 2**retry), hint_s or 0.0)


def call_with_retries(
    client: EngineClient,
    requests: list[dict],
    ids: Sequence[str],
    role: str,
    policy: RetryPolicy = RetryPolicy(),
    sleep: Callable[[float], Any] = time.sleep,
) -> list[dict]:
    """One response per request, in order, retrying transient failures row by row (see module doc)."""
    if len(ids) != len(requests):
        raise ValueError(f"{len(requests)} requests but {len(ids)} row ids")
    results: list[dict | None] = [None] * len(requests)
    pending = list(range(len(requests)))
    attempt = 0
    while pending:
        try:
            outs = list(client.generate([requests[i] for i in pending]))
        except Exception as err:  # noqa: BLE001 - a client that raises fails every row it was given
            outs = [err] * len(pending)
        if len(outs) != len(pending):
            raise EngineError(
                role,
                [ids[i] for i in pending],
                f"the engine returned {len(outs)} replies for {len(pending)} requests",
                attempt + 1,
            )
        failed: list[tuple[int, BaseException]] = []
        for i, out in zip(pending, outs):
            if isinstance(out, BaseException):
                failed.append((i, out))
            elif not isinstance(out, dict) or not isinstance(out.get("text"), str):
                raise EngineError(role, [ids[i]], f"malformed reply {str(out)[:200]!r}", attempt + 1)
            else:
                results[i] = out
        if not failed:
            break
        permanent = [(i, e) for i, e in failed if not is_retryable(e)]
        give_up = bool(permanent) or attempt >= policy.max_retries
        hints = [h for _, e in failed if (h := _retry_after(e)) is not None]
        delay = 0.0 if give_up else policy.delay(attempt, max(hints, default=None))
        _log_failures(role, ids, failed, attempt, policy, None if give_up else delay)
        if give_up:
            i, err = (permanent or failed)[0]
            rows = [ids[j] for j, _ in (permanent or failed)]
            raise EngineError(role, rows, err, attempt + 1) from err
        sleep(delay)
        pending = [i for i, _ in failed]
        attempt += 1
    return results  # type: ignore[return-value]


def _retry_after(err: BaseException) -> float | None:
    return err.retry_after_s if isinstance(err, EngineHTTPError) else None


def _log_failures(
    role: str,
    ids: Sequence[str],
    failed: list[tuple[int, BaseException]],
    attempt: int,
    policy: RetryPolicy,
    delay: float | None,
) -> None:
    """One log line per distinct error: role, attempt, every affected row id, and what happens next."""
    groups: dict[str, list[str]] = {}
    for i, err in failed:
        groups.setdefault(_describe(err), []).append(ids[i])
    then = f"retrying in {delay:.1f}s" if delay is not None else "giving up"
    for what, rows in groups.items():
        log.warning(
            "%s engine error on %d row(s) [%s] (attempt %d of %d, %s): %s",
            role,
            len(rows),
            _id_list(rows, limit=64),
            attempt + 1,
            policy.max_retries + 1,
            then,
            what,
        )


def _describe(err: BaseException | str) -> str:
    if isinstance(err, str):
        return err
    text = str(err).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return f"{type(err).__name__}: {first[:500]}"


def _id_list(ids: Sequence[str], limit: int = 8) -> str:
    head = ", ".join(str(i) for i in ids[:limit])
    return head + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")
