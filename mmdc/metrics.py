"""MmDC metrics on the Ray dashboard: the driver's per-phase records as ``ray.util.metrics``.

Why: ``metrics.jsonl`` in the run directory is the record of a run, but someone watching a 340-hour
job wants the numbers live, beside Ray's own (GPU use, object store, Serve latency). Ray exports
every ``ray.util.metrics`` metric to its Prometheus endpoint with a ``ray_`` prefix (counters also
get ``_total``; histograms ``_bucket`` / ``_sum`` / ``_count``), and the dashboard's Grafana panels
read them from there. ``cluster/grafana/mmdc-dashboard.json`` is a dashboard for these metrics.

The driver calls two functions:

    publish_phase(record, run="paper-20250101")   # the record PhaseLog.run() logs, after each phase
    publish_state(iteration, phase, run=...)      # when a phase starts: "what is running now" gauges

Metric objects are created lazily, on the first publish inside a connected Ray process (the driver
actor): importing this module never needs Ray, and publishing without Ray initialised is a no-op that
returns False. Tags are always ``run`` and, where meaningful, ``phase`` and ``role``; values that a
record lacks or holds as None are not published (no zero that reads like a measurement).

Where to read them: every node serves its metrics at ``metrics_endpoints()`` (Prometheus text format;
the node's metrics agent exports even when the dashboard is off). Gauges live as long as the process
that set them: about 20 s after the driver actor exits they drop out of the endpoint, while counters
and histograms stay, so a Prometheus that scrapes during the run is what keeps the gauges' history.
``dashboard_url()`` is the dashboard to link in log lines.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# Which roles' rows a phase processes: "rows" of a phase count once for each of its roles.
# Teacher, referee and augmentor share one engine but are separate roles (verl habit: one name per
# role in logs, metrics, files and config).
PHASE_ROLES: dict[str, tuple[str, ...]] = {
    "prepare": ("data",),
    "align": ("student",),
    "teach": ("teacher",),
    "tune": ("student",),
    "assess": ("student", "referee"),
    "augment": ("augmentor",),
    "eval": ("student",),  # benchmarks on the current student
    "eval_teacher": ("teacher",),  # the teacher's reference line, once
}
PHASES: tuple[str, ...] = tuple(PHASE_ROLES)

# Phase durations range from seconds (tiny runs) to days (the paper's teach phase over 220K rows).
DURATION_BOUNDARIES_S: list[float] = [1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 72 * 3600]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its Ray kind, description and tag keys (Ray rejects a record missing a tag key)."""

    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    tag_keys: tuple[str, ...]


METRICS: dict[str, MetricSpec] = {
    "mmdc_rows": MetricSpec("counter", "Rows processed, per phase and role", ("run", "phase", "role")),
    "mmdc_phase_duration_seconds": MetricSpec("histogram", "Wall time of completed phases", ("run", "phase")),
    "mmdc_phase_last_duration_seconds": MetricSpec("gauge", "Wall time of the phase's latest run", ("run", "phase")),
    "mmdc_phases_completed": MetricSpec("counter", "Completed phases", ("run", "phase")),
    "mmdc_rows_per_second": MetricSpec("gauge", "Rows per second of the phase's latest run", ("run", "phase")),
    "mmdc_generated_tokens_per_second": MetricSpec(
        "gauge", "Generated tokens per second of the phase's latest run", ("run", "phase")
    ),
    "mmdc_teacher_cache": MetricSpec(
        "counter", "Teacher answer-cache lookups, result = hit | miss", ("run", "phase", "result")
    ),
    "mmdc_assessed_instructions": MetricSpec(
        "gauge", "Latest assessment: instructions per difficulty (hard | easy | unscored)", ("run", "difficulty")
    ),
    "mmdc_unscored": MetricSpec("counter", "Instructions the referee could not score", ("run",)),
    "mmdc_hard_ratio": MetricSpec("gauge", "Latest assessment: hard / scored", ("run",)),
    "mmdc_generated_questions": MetricSpec("counter", "Candidate questions the augmentor wrote", ("run",)),
    "mmdc_accepted_questions": MetricSpec("counter", "Candidate questions accepted into the pools", ("run",)),
    "mmdc_acceptance_ratio": MetricSpec("gauge", "Latest augmentation: accepted / generated", ("run",)),
    "mmdc_pool_rows": MetricSpec("gauge", "Rows in the next iteration's pool (tuning | cache)", ("run", "pool")),
    "mmdc_train_loss": MetricSpec("gauge", "Final training loss of the stage's latest run", ("run", "phase")),
    "mmdc_train_samples_per_second": MetricSpec(
        "gauge", "Training samples per second of the stage's latest run", ("run", "phase")
    ),
    "mmdc_train_tokens_per_second": MetricSpec(
        "gauge", "Training tokens per second of the stage's latest run", ("run", "phase")
    ),
    "mmdc_eval_score": MetricSpec(
        "gauge",
        "Latest evaluation: headline score per benchmark (e.g. world_Avg), model = student | teacher",
        ("run", "model", "score"),
    ),
    "mmdc_iteration": MetricSpec("gauge", "Current distillation-calibration iteration (0 = before stage 2)", ("run",)),
    "mmdc_phase_active": MetricSpec("gauge", "1 for the phase running now, 0 for the others", ("run", "phase")),
}


def prometheus_names() -> set[str]:
    """Every series name Ray's Prometheus endpoint exports for ``METRICS`` (``ray_`` prefix added)."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {f"ray_{name}{s}" for name, spec in METRICS.items() for s in suffixes[spec.kind]}


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / None / NaN / non-numeric values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class MmdcMetrics:
    """Maps driver records onto Ray metrics for one run.

    ``backend`` is anything with ``Counter``, ``Gauge`` and ``Histogram`` constructors taking Ray's
    signatures (``ray.util.metrics`` by default, resolved on first use); tests pass a fake.
    """

    def __init__(self, run: str, backend: Any | None = None):
        if not run:
            raise ValueError("MmdcMetrics needs a non-empty run name (it tags every metric)")
        self.run = run
        self._backend = backend
        self._metrics: dict[str, Any] = {}
        self._active_phases: set[str] = set()  # every phase ever marked active, so each is reset later

    # ---------------------------------------------------------------- metric objects, made lazily
    def _get(self, name: str) -> Any:
        if name not in self._metrics:
            spec = METRICS[name]
            backend = self._backend
            if backend is None:
                import ray.util.metrics as backend  # noqa: PLC0415 - only inside a Ray process

                self._backend = backend
            if spec.kind == "counter":
                metric = backend.Counter(name, description=spec.description, tag_keys=spec.tag_keys)
            elif spec.kind == "gauge":
                metric = backend.Gauge(name, description=spec.description, tag_keys=spec.tag_keys)
            else:
                metric = backend.Histogram(
                    name, description=spec.description, boundaries=DURATION_BOUNDARIES_S, tag_keys=spec.tag_keys
                )
            self._metrics[name] = metric
        return self._metrics[name]

    def _tags(self, **tags: str) -> dict[str, str]:
        return {"run": self.run, **{k: str(v) for k, v in tags.items()}}

    def _inc(self, name: str, value: Any, **tags: str) -> None:
        v = _number(value)
        if v is not None and v > 0:  # Ray's Counter.inc refuses 0 and negatives
            self._get(name).inc(v, tags=self._tags(**tags))

    def _set(self, name: str, value: Any, **tags: str) -> None:
        v = _number(value)
        if v is not None:
            self._get(name).set(v, tags=self._tags(**tags))

    def _observe(self, name: str, value: Any, **tags: str) -> None:
        v = _number(value)
        if v is not None and v >= 0:
            self._get(name).observe(v, tags=self._tags(**tags))

    # ---------------------------------------------------------------- public
    def publish_phase(self, record: Mapping[str, Any]) -> None:
        """Update the metrics from one completed phase's record (``PhaseLog.run`` keys).

        Records without a ``phase`` (deploy / release events in metrics.jsonl) are ignored.
        """
        phase = record.get("phase")
        if not phase:
            return
        phase = str(phase)
        for role in PHASE_ROLES.get(phase, ("unknown",)):
            self._inc("mmdc_rows", record.get("rows"), phase=phase, role=role)
        self._inc("mmdc_phases_completed", 1, phase=phase)
        self._observe("mmdc_phase_duration_seconds", record.get("wall_s"), phase=phase)
        self._set("mmdc_phase_last_duration_seconds", record.get("wall_s"), phase=phase)
        self._set("mmdc_rows_per_second", record.get("rows_per_s"), phase=phase)
        self._set("mmdc_generated_tokens_per_second", record.get("gen_tokens_per_s"), phase=phase)
        self._inc("mmdc_teacher_cache", record.get("cache_hits"), phase=phase, result="hit")
        self._inc("mmdc_teacher_cache", record.get("cache_misses"), phase=phase, result="miss")
        if phase == "assess":
            for difficulty in ("hard", "easy", "unscored"):
                self._set("mmdc_assessed_instructions", record.get(difficulty), difficulty=difficulty)
            self._inc("mmdc_unscored", record.get("unscored"))
            self._set("mmdc_hard_ratio", record.get("hard_ratio"))
        if phase == "augment":
            self._inc("mmdc_generated_questions", record.get("generated"))
            self._inc("mmdc_accepted_questions", record.get("accepted"))
            self._set("mmdc_acceptance_ratio", record.get("acceptance_ratio"))
            self._set("mmdc_pool_rows", record.get("tuning_after"), pool="tuning")
            self._set("mmdc_pool_rows", record.get("cache_after"), pool="cache")
        if phase in ("eval", "eval_teacher"):  # headline keys of eval.iteration.headline_metrics
            model = "teacher" if phase == "eval_teacher" else "student"
            for key, value in record.items():
                if key.startswith("eval_"):
                    self._set("mmdc_eval_score", value, model=model, score=key.removeprefix("eval_"))
        if phase in ("align", "tune"):
            self._set("mmdc_train_loss", record.get("train_final_loss"), phase=phase)
            wall = _number(record.get("train_wall_time_s"))
            if wall:
                samples, tokens = _number(record.get("train_samples")), _number(record.get("train_tokens"))
                self._set("mmdc_train_samples_per_second", samples / wall if samples is not None else None, phase=phase)
                self._set("mmdc_train_tokens_per_second", tokens / wall if tokens is not None else None, phase=phase)

    def publish_state(self, iteration: int, phase: str) -> None:
        """Set the 'now running' gauges: the iteration, and 1 for ``phase`` / 0 for every other phase.

        Phases outside ``PHASES`` are remembered and reset too, so a new phase name in the driver never
        leaves a stale 1 behind.
        """
        self._set("mmdc_iteration", iteration)
        self._active_phases.add(phase)
        for name in dict.fromkeys((*PHASES, *sorted(self._active_phases))):
            self._set("mmdc_phase_active", 1 if name == phase else 0, phase=name)


# ------------------------------------------------------------------ module-level convenience
_PUBLISHERS: dict[str, MmdcMetrics] = {}


def _ray_ready() -> bool:
    """True inside a process connected to Ray (a driver, worker or actor)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency, but metrics must never break a run
        return False
    return ray.is_initialized()


def _publisher(run: str) -> MmdcMetrics:
    if run not in _PUBLISHERS:
        _PUBLISHERS[run] = MmdcMetrics(run)
    return _PUBLISHERS[run]


def _guarded(fn: Callable[[MmdcMetrics], None], run: str) -> bool:
    if not _ray_ready():
        return False
    fn(_publisher(run))
    return True


def publish_phase(record: Mapping[str, Any], run: str = "mmdc") -> bool:
    """Publish one phase record for ``run``; False (and nothing done) when Ray is not initialised."""
    return _guarded(lambda m: m.publish_phase(record), run)


def publish_state(iteration: int, phase: str, run: str = "mmdc") -> bool:
    """Publish the current iteration and phase for ``run``; False when Ray is not initialised."""
    return _guarded(lambda m: m.publish_state(iteration, phase), run)


# ------------------------------------------------------------------ where to look
def dashboard_url() -> str | None:
    """The Ray dashboard of the connected cluster (``http://host:port``); None without Ray or without a dashboard.

    Why not ``ray.init().address_info["webui_url"]``: only the process that called ``ray.init`` has it,
    and the driver is an actor. Ray keeps the URL in its GCS key-value store (key ``webui:url`` in the
    ``dashboard`` namespace, where ``ray.init`` itself reads it when joining a cluster), and
    ``RAY_OVERRIDE_DASHBOARD_URL`` wins over it, as in Ray (a proxy or ingress address).
    """
    url = os.environ.get("RAY_OVERRIDE_DASHBOARD_URL") or _dashboard_url_from_gcs()
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def _dashboard_url_from_gcs() -> str | None:
    if not _ray_ready():
        return None
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get("webui:url", namespace="dashboard")
    except Exception:  # noqa: BLE001 - a missing URL must never break a run
        return None
    return raw.decode() if raw else None


def metrics_endpoints() -> list[str]:
    """Prometheus endpoints of the cluster's live nodes (``http://ip:port/metrics``); [] without Ray."""
    if not _ray_ready():
        return []
    import ray

    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]
