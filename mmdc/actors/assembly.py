"""Assemble the student (``models.student_init: assemble``) in a Ray task sized for it, never in the driver.

The driver process holds no model weights. ``remote_assembler`` gives ``models.resolve`` a function with
``assemble_llava``'s signature that runs it in a Ray task asking for the memory ``mmdc.sizing.memory.assembly``
estimates for the student in its dtype (the parameter count comes from the parts' config.json, as the plan
counts them), so Ray places it on a node with that much memory free; the task's worker process exits
afterwards (``max_calls=1``), and its memory with it. Measured against the estimate:
``benchmarks/results/assembly_save_memory.md``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmdc.config import ModelsConfig

Announce = Callable[[str], None]


@dataclass(frozen=True)
class AssemblyReport:
    """What the assembly task did: where it wrote the student, where it ran, what it held at most."""

    path: str
    pid: int
    node: str
    peak_rss: int  # bytes: the task's own high-water mark (reset before it started, where Linux allows)
    seconds: float


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark (Linux ``clear_refs`` 5); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's resident high-water mark in bytes (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def assemble_and_report(vision_tower: str, language_model: str, out_dir: str, **kwargs) -> AssemblyReport:
    """``assemble_llava`` with a report of this process's peak memory while it ran (the Ray task's body)."""
    from mmdc.train.assembly import assemble_llava

    reset_peak_rss()
    start = time.perf_counter()
    path = assemble_llava(vision_tower, language_model, out_dir, **kwargs)
    return AssemblyReport(path, os.getpid(), socket.gethostname(), peak_rss(), time.perf_counter() - start)


def assembly_memory(models: ModelsConfig, dtype: str) -> int | None:
    """Bytes the assembly of ``models``' student in ``dtype`` needs (``mmdc.sizing``); None when its parts cannot
    be sized (a hub id outside the published table whose config.json cannot be fetched either)."""
    from mmdc.sizing import memory
    from mmdc.sizing.architectures import ModelNotFound, assemble

    configs: dict[str, str] = {}
    for _ in range(2):
        try:
            arch = assemble(models.vision_tower, models.language_model, models.projector, configs, dtype)
        except ModelNotFound:
            configs = _hub_configs([models.vision_tower, models.language_model])
            if not configs:
                return None
            continue
        return memory.assembly(arch, dtype).total
    return None


def _hub_configs(ids: list[str]) -> dict[str, str]:
    """config.json of each hub id, fetched (the task downloads the weights next anyway); {} when one fails."""
    try:
        from huggingface_hub import hf_hub_download

        return {i: hf_hub_download(i, "config.json") for i in ids if not Path(i).exists()}
    except Exception:  # noqa: BLE001 - offline, gated, unknown: the task then runs without a memory request
        return {}


def remote_assembler(models: ModelsConfig, announce: Announce) -> Callable[..., str]:
    """``assemble_llava``'s signature, run in a Ray task that asks for the memory the student needs."""

    def run(vision_tower: str, language_model: str, out_dir: str, *, projector: str, dtype: str) -> str:
        import ray

        need = assembly_memory(models, dtype)
        options = {"num_cpus": 1, **({"memory": need} if need else {})}
        announce(
            f"assembling the student in {dtype} in a Ray task "
            + (f"that asks for {need / 1024**3:.1f} GiB of memory" if need else "(its size unknown: no memory asked)")
        )
        largest = max((n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
        if need and need > largest:  # Ray keeps the task pending until a node has it: say so instead of hanging
            announce(
                f"no node has {need / 1024**3:.1f} GiB of Ray memory for the assembly now (the largest "
                f"{largest / 1024**3:.1f}): it waits until one has (an autoscaler may add it)"
            )
        task = ray.remote(max_calls=1)(assemble_and_report).options(**options)  # its process exits afterwards
        report: AssemblyReport = ray.get(
            task.remote(vision_tower, language_model, out_dir, projector=projector, dtype=dtype)
        )
        announce(
            f"assembled the student into {report.path} on {report.node} (pid {report.pid}) in {report.seconds:.0f}s, "
            f"peak {report.peak_rss / 1024**3:.2f} GiB resident"
        )
        return report.path

    return run
