"""Whether a release has really given the cluster back: Ray's counts, leftover placement groups, GPU memory.

Deleting the Serve apps returns their resources to Ray's books at once, but the replica processes may still
hold GPU memory a while (vLLM with tensor parallelism is known to, vllm issue 20860), and a trainer started
then runs out of memory. So after a release the driver waits until, on the cluster as it is *now* (a node
the autoscaler removed meanwhile is simply gone from it):

- every CPU and GPU Ray counts is available again;
- no placement group that reserves GPUs is left (the engines' own, when a backend used one);
- on every GPU node, every GPU's used memory is at most ``FREE_GPU_BYTES``, read by a tiny Ray task pinned
  to the node: NVML (``pynvml``, from the GPU extras' ``nvidia-ml-py``; it also names the processes) when
  it imports, else ``torch.cuda.mem_get_info`` in a worker process that exits afterwards (``max_calls=1``,
  so its CUDA context goes with it).

A CPU-only cluster only has the first check. When the wait times out, the error names what still holds:
the node and GPU with its used memory and the Ray actors whose processes hold it (Ray's state API).
``still_held`` is the decision, a pure function over one ``ClusterView``; ``RayProbe`` reads the view.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

GIB = 1024**3
# A GPU whose used memory is at most this counts as free: what the driver and an idle CUDA context (the
# torch fallback's own probe) account for, well under what any engine or trainer holds.
FREE_GPU_BYTES = 1 * GIB
RESOURCES = ("CPU", "GPU")


@dataclass(frozen=True)
class GpuMemory:
    """One GPU of one node, as the probe read it."""

    node: str  # the node's IP (or id), for messages
    node_id: str
    index: int  # the device index on its node
    used: int  # bytes
    total: int  # bytes
    holders: tuple[tuple[int, int], ...] = ()  # (pid, bytes) of the processes using it, when NVML tells


@dataclass(frozen=True)
class ClusterView:
    """One look at the cluster after a release."""

    total: dict[str, float]  # ray.cluster_resources() now
    available: dict[str, float]  # ray.available_resources() now
    placement_groups: tuple[str, ...] = ()  # placement groups still reserving GPUs, described
    gpus: tuple[GpuMemory, ...] = ()  # every GPU of every GPU node alive now
    unread: tuple[str, ...] = field(default=())  # GPU nodes whose memory could not be read (and why)


def still_held(view: ClusterView, free_bytes: int = FREE_GPU_BYTES) -> list[str]:
    """What still holds resources in ``view``, one phrase each; empty when the release is complete.

    On a cluster without GPUs only Ray's CPU count is compared (placement groups and device memory are
    GPU matters here).
    """
    held = [
        f"{view.available.get(r, 0.0):g} of {view.total[r]:g} {r} available"
        for r in RESOURCES
        if r in view.total and view.available.get(r, 0.0) < view.total[r] - 1e-6
    ]
    if not view.total.get("GPU"):
        return held
    held += [f"placement group {pg}" for pg in view.placement_groups]
    for gpu in view.gpus:
        if gpu.used > free_bytes:
            held.append(f"node {gpu.node} GPU {gpu.index}: {gpu.used / GIB:.2f} of {gpu.total / GIB:.1f} GiB used")
    return held


class Probe(Protocol):
    """What the wait needs from a cluster (the connected Ray cluster, or a fake in tests)."""

    def view(self) -> ClusterView: ...

    def holders(self, view: ClusterView, free_bytes: int) -> list[str]: ...


def wait_until_released(
    probe: Probe,
    timeout_s: float,
    *,
    free_bytes: int = FREE_GPU_BYTES,
    poll_s: float = 2.0,
    cpu_poll_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll ``probe`` until nothing holds; TimeoutError naming what still does after ``timeout_s``.

    ``poll_s`` between looks at a GPU cluster (each reads every GPU node's memory), ``cpu_poll_s`` on one
    without GPUs (only Ray's counts, as cheap as before).
    """
    deadline = clock() + timeout_s
    while True:
        view = probe.view()
        held = still_held(view, free_bytes)
        if not held:
            return
        if clock() > deadline:
            who = probe.holders(view, free_bytes)
            raise TimeoutError(
                f"timed out after {timeout_s:.0f}s waiting for the engines' resources to be released: "
                + "; ".join(held)
                + (f" (held by {'; '.join(who)})" if who else "")
                + (f"; not read: {'; '.join(view.unread)}" if view.unread else "")
            )
        sleep(poll_s if view.total.get("GPU") else cpu_poll_s)


def read_gpu_memory() -> list[dict[str, Any]]:
    """Every GPU of this node: index, used and total bytes, and (NVML only) the processes using it."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        pynvml.nvmlInit()
        try:
            out = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                holders = [(int(p.pid), int(p.usedGpuMemory or 0)) for p in procs]
                out.append({"index": index, "used": int(info.used), "total": int(info.total), "holders": holders})
            return out
        finally:
            pynvml.nvmlShutdown()
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        out.append({"index": index, "used": int(total - free), "total": int(total), "holders": []})
    return out


class RayProbe:
    """The Ray cluster this process is connected to."""

    def __init__(self, read_timeout_s: float = 60.0) -> None:
        self.read_timeout_s = read_timeout_s
        self._reader: Any = None

    def view(self) -> ClusterView:
        import ray

        total, available = ray.cluster_resources(), ray.available_resources()
        if not total.get("GPU"):
            return ClusterView(total, available)
        return ClusterView(total, available, self._placement_groups(), *self._gpus())

    def _gpus(self) -> tuple[tuple[GpuMemory, ...], tuple[str, ...]]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self._reader is None:  # a fresh worker process per read, so a torch fallback's CUDA context dies with it
            self._reader = ray.remote(num_cpus=0, max_calls=1)(read_gpu_memory)
        reader = self._reader
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU")]
        pending = {
            reader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(): n
            for n in nodes
        }
        gpus, unread = [], []
        for ref, node in pending.items():
            where = node.get("NodeManagerAddress") or node["NodeID"]
            try:
                rows = ray.get(ref, timeout=self.read_timeout_s)
            except Exception as err:  # noqa: BLE001 - a node going away or a stuck read: say so, keep the others
                unread.append(f"{where} ({type(err).__name__})")
                ray.cancel(ref, force=True)
                continue
            gpus += [
                GpuMemory(where, node["NodeID"], r["index"], r["used"], r["total"], tuple(map(tuple, r["holders"])))
                for r in rows
            ]
        return tuple(gpus), tuple(unread)

    def _placement_groups(self) -> tuple[str, ...]:
        try:
            from ray.util.state import list_placement_groups

            groups = list_placement_groups(
                filters=[("state", "!=", "REMOVED")], detail=True, raise_on_missing_output=False
            )
        except Exception:  # noqa: BLE001 - no state API (no dashboard): the device memory still tells
            return ()
        out = []
        for pg in groups:
            bundles = getattr(pg, "bundles", None) or []
            gpus = sum(float((b.get("unit_resources") or b.get("unitResources") or {}).get("GPU", 0)) for b in bundles)
            if gpus:
                name = getattr(pg, "name", "") or pg.placement_group_id
                out.append(f"{name} ({pg.state}, {gpus:g} GPU)")
        return tuple(out)

    def holders(self, view: ClusterView, free_bytes: int) -> list[str]:
        """The Ray actors (by node and pid) using a GPU that is not free; what NVML and the state API tell."""
        busy = [g for g in view.gpus if g.used > free_bytes and g.holders]
        if not busy:
            return []
        try:
            from ray.util.state import list_actors

            actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False)
        except Exception:  # noqa: BLE001 - without the state API the pids are all there is
            actors = []
        names = {(a.node_id, a.pid): a.name or a.class_name for a in actors}
        return [
            f"node {g.node} GPU {g.index}: pid {pid} "
            + (f"(actor {names[(g.node_id, pid)]}) " if (g.node_id, pid) in names else "(not a Ray actor) ")
            + f"{nbytes / GIB:.2f} GiB"
            for g in busy
            for pid, nbytes in g.holders
        ]
