"""mmdc metrics reach Ray's Prometheus endpoint during a real (tiny) run, with sensible values.

The run is the session's ``tiny_run``; ``tiny_run_metrics`` scraped the node's metrics endpoint every
second while it ran (gauges vanish ~20 s after the driver actor exits; counters and histograms stay).
Values are checked against the run's own ``metrics.jsonl``, the record the metrics are published from.
"""

from __future__ import annotations

import json
import math

import pytest

from mmdc.metrics import PHASE_ROLES

pytestmark = pytest.mark.integration

RUN = "tiny"  # run tag = run directory name
PHASES = ("prepare", "align", "teach", "tune", "assess", "augment")


def _records(run_dir) -> dict[str, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["phase"]: r for r in lines if "phase" in r}


def _one(scraper, name: str, **labels: str) -> float | None:
    values = scraper.values(name, run=RUN, **labels)
    return next(iter(values.values())) if len(values) == 1 else None


def _last_phase(run_dir) -> str:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["phase"] for r in lines if "phase" in r][-1]


def test_endpoint_serves_mmdc_metrics_with_sensible_values(tiny_run, tiny_run_metrics):
    scraper, last_phase = tiny_run_metrics, _last_phase(tiny_run)
    final_eval = _records(tiny_run)["eval"]["eval_world_Avg"]  # the latest student score the gauge must hold

    def all_phases_exported(s) -> bool:
        return (
            all(_one(s, "ray_mmdc_phase_duration_seconds_count", phase=p) for p in PHASES)
            and _one(s, "ray_mmdc_hard_ratio") is not None
            and _one(s, "ray_mmdc_eval_score", model="student", score="world_Avg") == pytest.approx(final_eval)
            and _one(s, "ray_mmdc_phase_active", phase=last_phase) == 1.0
        )

    assert scraper.wait_for(all_phases_exported, timeout_s=60), (
        f"mmdc metrics missing from {scraper.urls}; seen: {sorted({n for n, _ in scraper.latest})}; "
        f"errors: {scraper.errors[-3:]}"
    )
    records = _records(tiny_run)

    for phase in ("prepare", "teach", "assess"):  # phases whose record counts rows
        for role in PHASE_ROLES[phase]:
            rows = _one(scraper, "ray_mmdc_rows_total", phase=phase, role=role)
            assert rows == records[phase]["rows"] > 0, (phase, role)
    for phase in PHASES:
        assert _one(scraper, "ray_mmdc_phases_completed_total", phase=phase) == 1.0, phase
        assert _one(scraper, "ray_mmdc_phase_duration_seconds_count", phase=phase) == 1.0, phase
        assert _one(scraper, "ray_mmdc_phase_duration_seconds_sum", phase=phase) > 0, phase
        wall = _one(scraper, "ray_mmdc_phase_last_duration_seconds", phase=phase)
        assert wall == pytest.approx(records[phase]["wall_s"], rel=1e-3) and wall > 0, phase

    hard_ratio = _one(scraper, "ray_mmdc_hard_ratio")
    assert 0.0 <= hard_ratio <= 1.0
    assert hard_ratio == pytest.approx(records["assess"]["hard_ratio"], abs=1e-6)
    for stage in ("align", "tune"):
        loss = _one(scraper, "ray_mmdc_train_loss", phase=stage)
        assert loss is not None and math.isfinite(loss) and loss > 0, stage
        assert _one(scraper, "ray_mmdc_train_samples_per_second", phase=stage) > 0, stage
    for phase, model in (("eval", "student"), ("eval_teacher", "teacher")):  # the world benchmark's headline
        score = _one(scraper, "ray_mmdc_eval_score", model=model, score="world_Avg")
        assert score == pytest.approx(records[phase]["eval_world_Avg"]) and 0.0 <= score <= 100.0, model
    assert _one(scraper, "ray_mmdc_iteration") == 1.0
    active = {dict(labels)["phase"]: v for labels, v in scraper.values("ray_mmdc_phase_active", run=RUN).items()}
    assert active[last_phase] == 1.0 and sum(active.values()) == 1.0, active  # the phase that ran last, nothing else


def test_dashboard_url_follows_the_cluster(ray_cluster):
    from mmdc.metrics import dashboard_url, metrics_endpoints

    assert dashboard_url() is None  # the session cluster runs without a dashboard (tests/conftest.py)
    assert metrics_endpoints() and all(u.startswith("http://") and u.endswith("/metrics") for u in metrics_endpoints())
