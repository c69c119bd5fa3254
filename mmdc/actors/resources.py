"""Resources are data: what each phase needs, checked against the cluster before anything starts.

The driver never waits for resources that cannot come: if the engines of an inference phase or
the trainer's workers do not fit the cluster's totals, the run stops at once with a message that
names the phase, the resource and both numbers.
"""

from __future__ import annotations

from mmdc.config import Config


def phase_needs(cfg: Config) -> dict[str, dict[str, float]]:
    """Peak resources per phase. Inference phases hold engines; training holds only its workers."""
    def engine(name: str) -> dict[str, float]:
        e = cfg.engines[name]
        return {"CPU": e.num_cpus * e.replicas, "GPU": e.num_gpus * e.replicas}

    teacher, student = engine("teacher"), engine("student")
    needs = {
        "teach": teacher,
        "assess": {k: teacher[k] + student[k] for k in ("CPU", "GPU")},
        "augment": teacher,
    }
    for stage in ("align", "tune"):
        t = getattr(cfg, stage)
        if t.enabled:
            needs[stage] = {"CPU": t.cpus_per_worker * t.num_workers, "GPU": t.gpus_per_worker * t.num_workers}
    return needs


def check_fits(cfg: Config, cluster: dict[str, float]) -> list[str]:
    """Human-readable problems; empty when every phase fits the cluster's total resources."""
    problems = []
    for phase, need in phase_needs(cfg).items():
        for res, amount in need.items():
            have = float(cluster.get(res, 0.0))
            if amount > have + 1e-9:
                problems.append(f"phase '{phase}' needs {amount:g} {res} but the cluster has {have:g}")
    return problems
