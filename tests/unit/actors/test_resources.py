"""mmdc/actors/resources.py: phases that cannot fit the cluster are reported, with numbers; an autoscaling
cluster is asked for the largest phase's bundles and waited for (fake clusters and clocks, no Ray)."""

import pytest

from mmdc.actors.resources import (
    check_fits,
    describe_bundles,
    phase_bundles,
    phase_needs,
    request_bundles,
    resource_action,
    wait_for_resources,
)
from mmdc.config import ConfigError, load_config


def test_assess_holds_teacher_and_student_engines():
    cfg = load_config(None, ["engines.teacher.num_gpus=2", "engines.teacher.replicas=2", "engines.student.num_gpus=1"])
    needs = phase_needs(cfg)
    assert needs["teach"]["GPU"] == 4
    assert needs["assess"]["GPU"] == 5


def test_fits_and_does_not_fit():
    cfg = load_config(
        None,
        [
            "tune.num_workers=2",
            "tune.cpus_per_worker=0.5",
            "align.num_workers=2",
            "align.cpus_per_worker=0.5",
            "tune.micro_batch_size=4",
            "align.micro_batch_size=4",
        ],
    )
    assert check_fits(cfg, {"CPU": 2.0}) == []
    problems = check_fits(cfg, {"CPU": 1.0})
    assert any("phase 'assess' needs 2 CPU but the cluster has 1" in p for p in problems)


def test_disabled_stage_needs_nothing():
    cfg = load_config(
        None, ["align.enabled=false", "tune.gpus_per_worker=1", "tune.num_workers=2", "tune.micro_batch_size=8"]
    )
    needs = phase_needs(cfg)
    assert "align" not in needs
    assert check_fits(cfg, {"CPU": 4, "GPU": 1}) == ["phase 'tune' needs 2 GPU but the cluster has 1"]


# ------------------------------------------------------------------------ autoscaling


def _gpu_cfg():
    """Paper-like shapes: 2 teacher replicas of 2 GPUs, a 1-GPU student, tune on 6 GPU workers."""
    return load_config(
        None,
        [
            "engines.teacher.num_gpus=2",
            "engines.teacher.num_cpus=4",
            "engines.teacher.replicas=2",
            "engines.student.num_gpus=1",
            "engines.student.num_cpus=2",
            "tune.num_workers=6",
            "tune.gpus_per_worker=1",
            "tune.cpus_per_worker=1",
            "tune.micro_batch_size=1",
            "tune.global_batch_size=12",
            "align.enabled=false",
        ],
    )


class FakeCluster:
    """A cluster whose totals grow to ``later`` after ``polls`` reads, once something was requested."""

    def __init__(self, now: dict, later: dict | None = None, polls: int = 2, autoscale: bool = True):
        self.now, self.later, self.polls, self.autoscale = now, later, polls, autoscale
        self.requested: list | None = None
        self.reads = 0

    def resources(self) -> dict:
        self.reads += 1
        grown = self.requested is not None and self.later is not None and self.reads > self.polls
        return self.later if grown else self.now

    def can_autoscale(self) -> bool:
        return self.autoscale

    def request(self, bundles: list) -> None:
        self.requested = bundles

    def pending(self) -> str:
        return "launching 2 x gpu-v100"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def _wait(cfg, cluster, timeout_s=600.0):
    clock, said = FakeClock(), []
    requested = wait_for_resources(
        cfg, timeout_s, cluster, say=said.append, poll_s=5, log_every_s=10, clock=clock, sleep=clock.sleep
    )
    return requested, said, clock.t


def test_clip_filter_actors_are_checked_only_when_they_run():
    off = phase_needs(load_config(None, []))
    assert "clip_filter" not in off
    cfg = load_config(
        None, ["data.clip_filter.enabled=true", "data.clip_filter.concurrency=2", "data.clip_filter.num_gpus=1"]
    )
    assert phase_bundles(cfg)["clip_filter"] == [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert "phase 'clip_filter' needs 2 GPU but the cluster has 0" in check_fits(cfg, {"CPU": 8})
    no_align = load_config(None, ["data.clip_filter.enabled=true", "align.enabled=false"])
    assert "clip_filter" not in phase_needs(no_align)


def test_phase_bundles_are_per_replica_and_per_worker():
    bundles = phase_bundles(_gpu_cfg())
    assert bundles["teach"] == [{"CPU": 4, "GPU": 2}] * 2
    assert bundles["assess"] == [{"CPU": 4, "GPU": 2}] * 2 + [{"CPU": 2, "GPU": 1}]
    assert bundles["tune"] == [{"CPU": 1, "GPU": 1}] * 6
    assert "align" not in bundles


def test_request_covers_the_largest_phase_and_tops_up_the_others():
    cfg = _gpu_cfg()
    bundles = request_bundles(cfg)
    # tune (6 GPUs) is the largest; assess needs 10 CPUs against tune's 6: four 1-CPU bundles on top
    assert bundles == [{"CPU": 1, "GPU": 1}] * 6 + [{"CPU": 1.0}] * 4
    totals = {r: sum(b.get(r, 0) for b in bundles) for r in ("CPU", "GPU")}
    assert check_fits(cfg, totals) == []
    assert describe_bundles(bundles) == "6 x {CPU: 1, GPU: 1} + 4 x {CPU: 1}"


def test_request_adds_a_fractional_rest():
    cfg = load_config(None, ["engines.teacher.num_cpus=1.5", "tune.cpus_per_worker=0.5", "align.enabled=false"])
    bundles = request_bundles(cfg)  # assess 2.5 CPUs is largest; nothing to top up
    assert sum(b["CPU"] for b in bundles) == 2.5
    cfg = load_config(
        None,
        [
            "engines.teacher.num_gpus=1",
            "engines.student.num_cpus=0",
            "tune.cpus_per_worker=1.75",
            "align.enabled=false",
        ],
    )
    bundles = request_bundles(cfg)  # assess (1 GPU, 1 CPU) is largest; tune needs 3.5 CPUs
    assert bundles == [{"CPU": 1, "GPU": 1}, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 0.5}]


def test_resource_action():
    assert resource_action([], False, 0, 0) == "ok"
    assert resource_action(["x"], True, 10, 600) == "wait"
    assert resource_action(["x"], True, 600, 600) == "fail"
    assert resource_action(["x"], False, 0, 600) == "fail"


def test_fitting_cluster_returns_without_a_request():
    cluster = FakeCluster({"CPU": 32, "GPU": 6})
    assert _wait(_gpu_cfg(), cluster) == (False, [], 0.0)
    assert cluster.requested is None


def test_fixed_cluster_fails_at_once_with_the_fit_message():
    cluster = FakeCluster({"CPU": 2}, autoscale=False)
    msg = "do not fit this cluster:\n  phase 'teach' needs 8 CPU but the cluster has 2\n  phase 'teach' needs 4 GPU"
    with pytest.raises(ConfigError, match=msg):
        _wait(_gpu_cfg(), cluster)
    assert cluster.requested is None and cluster.reads == 1


def test_zero_timeout_never_waits():
    cluster = FakeCluster({"CPU": 2})
    with pytest.raises(ConfigError, match="do not fit"):
        _wait(_gpu_cfg(), cluster, timeout_s=0)
    assert cluster.requested is None


def test_autoscaling_cluster_gets_the_request_and_is_waited_for():
    cluster = FakeCluster({"CPU": 2}, later={"CPU": 34, "GPU": 6}, polls=4)
    requested, said, waited = _wait(_gpu_cfg(), cluster)
    assert requested and cluster.requested == request_bundles(_gpu_cfg())
    assert waited == 20.0  # four 5 s polls
    assert said[0].startswith("asked the autoscaler for 6 x {CPU: 1, GPU: 1} + 4 x {CPU: 1}; waiting up to 600s")
    assert any("still waiting" in s and "launching 2 x gpu-v100" in s for s in said)
    assert said[-1] == "the cluster has what the run needs after 20s"


def test_autoscaling_that_never_arrives_fails_after_the_timeout():
    cluster = FakeCluster({"CPU": 2})
    with pytest.raises(ConfigError, match=r"(?s)needs 6 GPU but the cluster has 0.*waited 60s for the autoscaler"):
        _wait(_gpu_cfg(), cluster, timeout_s=60)
