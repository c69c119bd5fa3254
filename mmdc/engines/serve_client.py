"""Clients that reach an engine through its Serve deployment handle (backends hf and vllm).

Both deployments answer the same two methods, so one pair of clients serves both:

- ``ServeBatchClient``: one ``generate_batch`` call per Ray Data batch (``request_mode: batch``);
  the engine splits it into forward batches of ``max_batch_size`` rows. A failure fails every row
  of the call; the processor retries those rows.
- ``ServeRowClient``: one ``generate`` call per row, all in flight at once (``request_mode: row``);
  the replica batches them (hf: ``@serve.batch``; vllm: continuous batching). A failure fails
  only its own row. Serve's router spreads the rows over the replicas.

A call that outlives ``timeout_s`` is cancelled (so a stuck replica stops working on it) and
reported as a ``TimeoutError``, which the processor retries like a dead replica.
"""

from __future__ import annotations

import time
from typing import Any

from mmdc.engines.protocol import Outcome


class ServeBatchClient:
    """``request_mode: batch``: one Serve request per Ray Data batch; the engine splits it into forward batches.

    One request per batch, not one per ``max_batch_size`` rows: every request costs the replica a
    hand-off (arguments, a thread of Serve's pool, GIL contention with the request that is
    generating), so on CPU fewer, larger requests win: in one run on 2 cores, 128-, 64- and
    16-row requests ran at 1.53x, 1.42x and 0.99x of a single process batching the same rows
    (benchmarks/results/engine_throughput.md). An hf replica takes one batch at a time, so run
    at least as many clients as replicas (``pipeline.concurrency``). A failed request fails every
    row of the batch, and the processor retries them.
    """

    def __init__(self, handle: Any, timeout_s: float):
        self.handle, self.timeout_s = handle, timeout_s

    def generate(self, requests: list[dict]) -> list[Outcome]:
        response = self.handle.generate_batch.remote(requests)
        try:
            return list(response.result(timeout_s=self.timeout_s))
        except Exception as err:  # noqa: BLE001 - returned as the outcome of each row of the batch
            if isinstance(err, TimeoutError):
                response.cancel()
            return [err] * len(requests)


class ServeRowClient:
    """``request_mode: row``: one Serve request per row, all sent before any is awaited."""

    def __init__(self, handle: Any, timeout_s: float):
        self.handle, self.timeout_s = handle, timeout_s

    def generate(self, requests: list[dict]) -> list[Outcome]:
        responses = [self.handle.generate.remote(r) for r in requests]
        deadline = time.monotonic() + self.timeout_s
        outs: list[Outcome] = []
        for response in responses:
            try:
                outs.append(response.result(timeout_s=max(0.001, deadline - time.monotonic())))
            except Exception as err:  # noqa: BLE001 - returned as this row's outcome
                if isinstance(err, TimeoutError):
                    response.cancel()
                outs.append(err)
        return outs
