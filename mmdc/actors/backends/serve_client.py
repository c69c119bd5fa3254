"""Clients that reach an engine through its Serve deployment handle (backends hf and vllm).

Both deployments answer the same two methods, so one pair of clients serves both:

- ``ServeBatchClient``: one ``generate_batch`` call per engine batch (``max_batch_size`` rows) of a
  Ray Data batch, all in flight together (``request_mode: batch``). A failure fails every row of
  its call; the stage retries those rows.
- ``ServeRowClient``: one ``generate`` call per row, all in flight at once (``request_mode: row``);
  the replica batches them (hf: ``@serve.batch``; vllm: continuous batching). A failure fails
  only its own row. Serve's router spreads the rows over the replicas.

A call that outlives ``timeout_s`` is cancelled (so a stuck replica stops working on it) and
reported as a ``TimeoutError``, which the stage retries like a dead replica.
"""

from __future__ import annotations

import time
from typing import Any

from mmdc.actors.backends.protocol import Outcome


class ServeBatchClient:
    """``request_mode: batch``: one Serve request per ``chunk_size`` rows, every chunk in flight at once.

    With a Ray Data batch of several engine batches (pipeline.batch_size a multiple of the engine's
    max_batch_size), Serve's router spreads one client's chunks over the replicas and each replica
    has its next batch queued while it computes this one, so fewer clients keep more
    replicas busy. A failed chunk fails only its own rows.
    """

    def __init__(self, handle: Any, timeout_s: float, chunk_size: int = 16):
        self.handle, self.timeout_s, self.chunk_size = handle, timeout_s, max(1, chunk_size)

    def generate(self, requests: list[dict]) -> list[Outcome]:
        chunks = [requests[i : i + self.chunk_size] for i in range(0, len(requests), self.chunk_size)]
        responses = [self.handle.generate_batch.remote(chunk) for chunk in chunks]
        deadline = time.monotonic() + self.timeout_s
        outs: list[Outcome] = []
        for chunk, response in zip(chunks, responses):
            try:
                outs.extend(response.result(timeout_s=max(0.001, deadline - time.monotonic())))
            except Exception as err:  # noqa: BLE001 - returned as the outcome of each row of the chunk
                if isinstance(err, TimeoutError):
                    response.cancel()
                outs.extend([err] * len(chunk))
        return outs


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
