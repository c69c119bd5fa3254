"""mmdc.metrics maps the driver's phase records onto Ray metrics (fake backend, no Ray cluster)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmdc import metrics
from mmdc.metrics import METRICS, MmdcMetrics


class _Fake:
    """Records every call; checks tags the way Ray does (every tag key present, str values)."""

    def __init__(self, log: list, kind: str, name: str, tag_keys: tuple[str, ...], **kwargs):
        self.log, self.kind, self.name, self.tag_keys = log, kind, name, tag_keys
        self.kwargs = kwargs

    def _record(self, op: str, value: float, tags: dict) -> None:
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        assert all(isinstance(v, str) for v in tags.values())
        self.log.append((self.name, op, value, tuple(sorted(tags.items()))))

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        assert value > 0, "Ray's Counter.inc refuses values <= 0"
        self._record("inc", value, tags or {})

    def set(self, value: float, tags: dict | None = None) -> None:
        self._record("set", value, tags or {})

    def observe(self, value: float, tags: dict | None = None) -> None:
        self._record("observe", value, tags or {})


class FakeBackend:
    def __init__(self):
        self.log: list = []
        self.created: dict[str, _Fake] = {}

    def _make(self, kind, name, description="", tag_keys=None, **kw):
        assert name not in self.created, f"{name} created twice"
        m = _Fake(self.log, kind, name, tuple(tag_keys or ()), description=description, **kw)
        self.created[name] = m
        return m

    def Counter(self, name, description="", tag_keys=None):  # noqa: N802 - Ray's names
        return self._make("counter", name, description, tag_keys)

    def Gauge(self, name, description="", tag_keys=None):  # noqa: N802
        return self._make("gauge", name, description, tag_keys)

    def Histogram(self, name, description="", boundaries=None, tag_keys=None):  # noqa: N802
        return self._make("histogram", name, description, tag_keys, boundaries=boundaries)

    def calls(self, name: str) -> dict:
        """{tags tuple without run: (op, value)} of the last call per tag set."""
        out = {}
        for n, op, value, tags in self.log:
            if n == name:
                out[tuple((k, v) for k, v in tags if k != "run")] = (op, value)
        return out


@pytest.fixture()
def fake():
    backend = FakeBackend()
    return backend, MmdcMetrics("r1", backend=backend)


def test_assess_record_maps_to_rows_difficulty_ratio_and_cache(fake):
    backend, m = fake
    m.publish_phase(
        {
            "iteration": 2,
            "phase": "assess",
            "rows": 120,
            "hard": 30,
            "easy": 80,
            "unscored": 10,
            "hard_ratio": 0.2727,
            "cache_hits": 100,
            "cache_misses": 20,
            "generated_tokens": 5000,
            "wall_s": 50.0,
            "rows_per_s": 2.4,
            "gen_tokens_per_s": 100.0,
        }
    )
    rows = backend.calls("mmdc_rows")
    assert rows == {
        (("phase", "assess"), ("role", "referee")): ("inc", 120.0),
        (("phase", "assess"), ("role", "student")): ("inc", 120.0),
    }
    assert backend.calls("mmdc_assessed_instructions") == {
        (("difficulty", "hard"),): ("set", 30.0),
        (("difficulty", "easy"),): ("set", 80.0),
        (("difficulty", "unscored"),): ("set", 10.0),
    }
    assert backend.calls("mmdc_unscored") == {(): ("inc", 10.0)}
    assert backend.calls("mmdc_hard_ratio") == {(): ("set", 0.2727)}
    assert backend.calls("mmdc_teacher_cache") == {
        (("phase", "assess"), ("result", "hit")): ("inc", 100.0),
        (("phase", "assess"), ("result", "miss")): ("inc", 20.0),
    }
    assert backend.calls("mmdc_phase_duration_seconds") == {(("phase", "assess"),): ("observe", 50.0)}
    assert backend.calls("mmdc_rows_per_second") == {(("phase", "assess"),): ("set", 2.4)}
    assert backend.calls("mmdc_generated_tokens_per_second") == {(("phase", "assess"),): ("set", 100.0)}
    # augment-only and train-only metrics are not touched by an assess record
    assert "mmdc_acceptance_ratio" not in backend.created
    assert "mmdc_train_loss" not in backend.created
    # every call carries the run tag
    assert all(dict(tags)["run"] == "r1" for _, _, _, tags in backend.log)


def test_augment_record_maps_acceptance_and_pools(fake):
    backend, m = fake
    m.publish_phase(
        {
            "iteration": 1,
            "phase": "augment",
            "rows": 30,
            "generated": 30,
            "accepted": 21,
            "acceptance_ratio": 0.7,
            "tuning_after": 42,
            "cache_after": 141,
            "policy": "refresh",
            "rejected": {"rouge_l": 9},
            "wall_s": 3.0,
        }
    )
    assert backend.calls("mmdc_rows") == {(("phase", "augment"), ("role", "augmentor")): ("inc", 30.0)}
    assert backend.calls("mmdc_generated_questions") == {(): ("inc", 30.0)}
    assert backend.calls("mmdc_accepted_questions") == {(): ("inc", 21.0)}
    assert backend.calls("mmdc_acceptance_ratio") == {(): ("set", 0.7)}
    assert backend.calls("mmdc_pool_rows") == {
        (("pool", "tuning"),): ("set", 42.0),
        (("pool", "cache"),): ("set", 141.0),
    }


def test_tune_record_gives_loss_and_throughput(fake):
    backend, m = fake
    m.publish_phase(
        {
            "iteration": 1,
            "phase": "tune",
            "train_final_loss": 1.25,
            "train_samples": 400,
            "train_tokens": 80_000,
            "train_wall_time_s": 20.0,
            "wall_s": 25.0,
        }
    )
    assert backend.calls("mmdc_train_loss") == {(("phase", "tune"),): ("set", 1.25)}
    assert backend.calls("mmdc_train_samples_per_second") == {(("phase", "tune"),): ("set", 20.0)}
    assert backend.calls("mmdc_train_tokens_per_second") == {(("phase", "tune"),): ("set", 4000.0)}
    assert "mmdc_rows" not in backend.created  # the tune record has no 'rows'


def test_eval_records_give_one_score_per_benchmark_and_model(fake):
    backend, m = fake
    m.publish_phase(
        {"iteration": 2, "phase": "eval", "rows": 72, "eval_world_Avg": 11.11, "eval_seed_Overall": None, "wall_s": 3.0}
    )
    m.publish_phase({"iteration": 0, "phase": "eval_teacher", "rows": 72, "eval_world_Avg": 47.22, "wall_s": 3.0})
    assert backend.calls("mmdc_eval_score") == {
        (("model", "student"), ("score", "world_Avg")): ("set", 11.11),
        (("model", "teacher"), ("score", "world_Avg")): ("set", 47.22),
    }  # a benchmark without a score (None) publishes nothing


def test_missing_none_nan_and_zero_values_are_not_published(fake):
    backend, m = fake
    # hard_ratio None (nothing scored), zero cache hits, NaN loss, zero rows: no measurement to report
    m.publish_phase(
        {
            "iteration": 1,
            "phase": "assess",
            "rows": 0,
            "hard": 0,
            "easy": 0,
            "unscored": 0,
            "hard_ratio": None,
            "cache_hits": 0,
            "cache_misses": 0,
            "wall_s": 0.5,
        }
    )
    m.publish_phase(
        {
            "iteration": 1,
            "phase": "tune",
            "train_final_loss": float("nan"),
            "train_wall_time_s": 0,
            "skipped": "0 conversations make no optimizer step",
            "rows": 0,
        }
    )
    assert "mmdc_hard_ratio" not in backend.created
    assert "mmdc_rows" not in backend.created
    assert "mmdc_teacher_cache" not in backend.created
    assert "mmdc_unscored" not in backend.created
    assert "mmdc_train_loss" not in backend.created
    assert "mmdc_train_samples_per_second" not in backend.created
    # zero counts are still valid gauge readings
    assert backend.calls("mmdc_assessed_instructions")[(("difficulty", "hard"),)] == ("set", 0.0)
    assert backend.calls("mmdc_phases_completed") == {
        (("phase", "assess"),): ("inc", 1.0),
        (("phase", "tune"),): ("inc", 1.0),
    }


def test_event_records_without_phase_are_ignored(fake):
    backend, m = fake
    m.publish_phase({"event": "deploy", "engine": "teacher", "wall_s": 3.0})
    assert backend.log == []


def test_metric_objects_are_created_once_and_reused(fake):
    backend, m = fake
    for _ in range(3):
        m.publish_phase({"iteration": 1, "phase": "teach", "rows": 5, "wall_s": 1.0})
    assert sum(1 for n, *_ in backend.log if n == "mmdc_rows") == 3
    assert backend.created["mmdc_phase_duration_seconds"].kwargs["boundaries"] == metrics.DURATION_BOUNDARIES_S
    for name, made in backend.created.items():
        assert made.kind == METRICS[name].kind and made.tag_keys == METRICS[name].tag_keys


def test_publish_state_marks_one_active_phase(fake):
    backend, m = fake
    m.publish_state(2, "tune")
    m.publish_state(2, "assess")
    assert backend.calls("mmdc_iteration") == {(): ("set", 2.0)}
    active = {dict(k)["phase"]: v[1] for k, v in backend.calls("mmdc_phase_active").items()}
    assert active["assess"] == 1.0
    assert set(active) == set(metrics.PHASES)
    assert sum(active.values()) == 1.0
    m.publish_state(2, "report")  # a phase name the module does not know yet
    m.publish_state(3, "teach")
    active = {dict(k)["phase"]: v[1] for k, v in backend.calls("mmdc_phase_active").items()}
    assert active["report"] == 0.0 and active["teach"] == 1.0 and sum(active.values()) == 1.0


def test_module_functions_are_noops_without_ray(monkeypatch):
    monkeypatch.setattr(metrics, "_ray_ready", lambda: False)
    assert metrics.publish_phase({"phase": "teach", "rows": 3}, run="x") is False
    assert metrics.publish_state(1, "teach", run="x") is False


def test_module_functions_use_one_publisher_per_run(monkeypatch):
    backend = FakeBackend()
    monkeypatch.setattr(metrics, "_ray_ready", lambda: True)
    monkeypatch.setattr(metrics, "_PUBLISHERS", {})
    monkeypatch.setattr(
        metrics, "_publisher", lambda run: metrics._PUBLISHERS.setdefault(run, MmdcMetrics(run, backend=backend))
    )
    assert metrics.publish_phase({"iteration": 1, "phase": "teach", "rows": 7}, run="a") is True
    assert metrics.publish_state(1, "teach", run="a") is True
    assert list(metrics._PUBLISHERS) == ["a"]
    assert backend.calls("mmdc_rows") == {(("phase", "teach"), ("role", "teacher")): ("inc", 7.0)}


def test_empty_run_name_is_refused():
    with pytest.raises(ValueError, match="run name"):
        MmdcMetrics("")


def test_prometheus_names_follow_ray_export_rules():
    names = metrics.prometheus_names()
    assert "ray_mmdc_rows_total" in names  # counters gain _total
    assert "ray_mmdc_hard_ratio" in names  # gauges keep their name
    assert {"ray_mmdc_phase_duration_seconds_bucket", "ray_mmdc_phase_duration_seconds_count"} <= names
    assert "ray_mmdc_rows" not in names


def test_module_imports_without_ray_initialised():
    # A fresh interpreter: importing mmdc.metrics must neither start Ray nor import ray.util.metrics.
    code = (
        "import sys, mmdc.metrics as m; import ray; assert not ray.is_initialized(); "
        "assert 'ray.util.metrics' not in sys.modules; print(len(m.METRICS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == len(METRICS)


def test_dashboard_url_without_ray_or_dashboard(monkeypatch):
    monkeypatch.delenv("RAY_OVERRIDE_DASHBOARD_URL", raising=False)
    monkeypatch.setattr(metrics, "_ray_ready", lambda: False)
    assert metrics.dashboard_url() is None
    assert metrics.metrics_endpoints() == []


def test_dashboard_url_comes_from_the_override_or_the_gcs(monkeypatch):
    monkeypatch.setenv("RAY_OVERRIDE_DASHBOARD_URL", "https://ray.example.org/dash")
    assert metrics.dashboard_url() == "https://ray.example.org/dash"
    monkeypatch.delenv("RAY_OVERRIDE_DASHBOARD_URL")
    monkeypatch.setattr(metrics, "_dashboard_url_from_gcs", lambda: "10.0.0.5:8265")  # how Ray stores it
    assert metrics.dashboard_url() == "http://10.0.0.5:8265"
    monkeypatch.setattr(metrics, "_dashboard_url_from_gcs", lambda: None)  # include_dashboard=False: empty key
    assert metrics.dashboard_url() is None
