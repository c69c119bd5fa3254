"""Fixtures for the training unit tests: a one-process torch.distributed group, no Ray."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest


@pytest.fixture
def process_group() -> Callable[[str], None]:
    """``start(backend)`` makes a one-process group (world size 1) on a free local port; torn down after the test."""
    import torch.distributed as dist

    def start(backend: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()
