"""After a release, the driver waits until the cluster is really free (mmdc/actors/release.py), decided on fakes."""

from __future__ import annotations

import sys
import types

import pytest

from mmdc.actors.release import GIB, ClusterView, GpuMemory, read_gpu_memory, still_held, wait_until_released


def gpu(node: str, index: int, used_gib: float, holders=()) -> GpuMemory:
    return GpuMemory(node, f"id-{node}", index, int(used_gib * GIB), 32 * GIB, tuple(holders))


class FakeProbe:
    """Hands out one view per look (the last one forever); names holders as the state API would."""

    def __init__(self, views: list[ClusterView], actors: dict[tuple[str, int], str] | None = None) -> None:
        self.views, self.actors, self.looks = views, actors or {}, 0

    def view(self) -> ClusterView:
        self.looks += 1
        return self.views[min(self.looks - 1, len(self.views) - 1)]

    def holders(self, view: ClusterView, free_bytes: int) -> list[str]:
        return [
            f"node {g.node} GPU {g.index}: pid {pid} (actor {self.actors.get((g.node_id, pid), '?')})"
            for g in view.gpus
            if g.used > free_bytes
            for pid, _ in g.holders
        ]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


FREE = {"CPU": 16.0, "GPU": 6.0}


def test_cpu_only_cluster_keeps_todays_check_counts_only():
    assert still_held(ClusterView({"CPU": 2.0}, {"CPU": 2.0})) == []
    assert still_held(ClusterView({"CPU": 2.0}, {"CPU": 1.0})) == ["1 of 2 CPU available"]


def test_counts_back_is_not_enough_while_a_gpu_still_holds_memory():
    """Defect d: Ray's books say the GPUs are free the moment the apps are deleted; a replica process still
    holding 12 GiB would make the trainer run out of memory."""
    view = ClusterView(FREE, dict(FREE), gpus=(gpu("10.0.0.5", 0, 0.3), gpu("10.0.0.5", 1, 12.0)))
    assert still_held(view) == ["node 10.0.0.5 GPU 1: 12.00 of 32.0 GiB used"]
    pg = ClusterView(FREE, dict(FREE), placement_groups=("teacher-pg (CREATED, 2 GPU)",), gpus=(gpu("a", 0, 0),))
    assert still_held(pg) == ["placement group teacher-pg (CREATED, 2 GPU)"]


def test_waits_until_the_memory_is_freed():
    busy = ClusterView(FREE, dict(FREE), gpus=(gpu("n1", 0, 20.0),))
    idle = ClusterView(FREE, dict(FREE), gpus=(gpu("n1", 0, 0.5),))
    probe, clock = FakeProbe([busy, busy, idle]), Clock()
    wait_until_released(probe, timeout_s=60, clock=clock, sleep=clock.sleep)
    assert probe.looks == 3 and clock.now == 4.0  # two GPU polls of 2 s


def test_compares_against_the_cluster_as_it_is_now():
    """A node the autoscaler removes meanwhile takes its GPUs out of the total too; a snapshot of the total
    taken before would wait for them until it timed out."""
    before = ClusterView({"CPU": 32.0, "GPU": 8.0}, {"CPU": 32.0, "GPU": 4.0}, gpus=(gpu("n1", 0, 0),))
    after = ClusterView({"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}, gpus=(gpu("n1", 0, 0),))
    probe, clock = FakeProbe([before, after]), Clock()
    wait_until_released(probe, timeout_s=60, clock=clock, sleep=clock.sleep)
    assert probe.looks == 2


def test_timeout_names_the_node_the_gpu_the_memory_and_the_actor():
    held = ClusterView(
        FREE,
        {"CPU": 16.0, "GPU": 5.0},
        placement_groups=("pg-1 (CREATED, 1 GPU)",),
        gpus=(gpu("10.0.0.7", 3, 14.25, holders=[(4242, int(14 * GIB))]),),
        unread=("10.0.0.9 (GetTimeoutError)",),
    )
    probe, clock = FakeProbe([held], actors={("id-10.0.0.7", 4242): "ServeReplica:teacher:LLMServer"}), Clock()
    with pytest.raises(TimeoutError) as err:
        wait_until_released(probe, timeout_s=10, clock=clock, sleep=clock.sleep)
    message = str(err.value)
    assert "timed out after 10s" in message
    assert "5 of 6 GPU available" in message and "placement group pg-1" in message
    assert "node 10.0.0.7 GPU 3: 14.25 of 32.0 GiB used" in message
    assert "pid 4242 (actor ServeReplica:teacher:LLMServer)" in message
    assert "not read: 10.0.0.9" in message


def test_reads_memory_and_processes_through_nvml_when_it_imports(monkeypatch):
    device = object()
    proc = types.SimpleNamespace(pid=77, usedGpuMemory=3 * GIB)
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: device,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * GIB + 1, total=32 * GIB),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [proc],
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert read_gpu_memory() == [{"index": 0, "used": 3 * GIB + 1, "total": 32 * GIB, "holders": [(77, 3 * GIB)]}]


def test_without_nvml_or_cuda_there_is_nothing_to_read(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU to read")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert read_gpu_memory() == []
