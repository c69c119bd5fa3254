"""Fixtures shared by the integration tests: one tiny MmDC run per session, watched like Prometheus would.

``tiny_run`` is the run directory of one whole MmDC loop on the embedded default (one iteration, small
pools) on the session's local Ray cluster; several test modules assert on it, so it runs once.
``tiny_run_metrics`` is what a Prometheus scraping the cluster's metrics endpoints every second saw
during (and after) that run. Scraping *during* the run matters: a gauge lives only as long as the
process that set it (the driver actor), and drops out of the endpoint ~20 s after the run ends.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import pyarrow as pa

TINY_OVERRIDES = [
    "run.iterations=1",
    "models.teacher=tiny:teacher-short",
    "data.world.num_images=12",
    "data.world.questions_per_image=3",
    "data.world.test_images=4",
    "align.epochs=1",
    "tune.epochs=1",
    "pipeline.batch_size=4",  # many small batches: a phase writes its output over a window a kill can hit (test_resume)
]

Series = tuple[str, frozenset]  # (sample name, frozenset of (label, value)) as Prometheus keys a series


class MetricsScraper:
    """Scrapes Prometheus endpoints in a background thread, keeping the latest value of every series.

    Only series whose name starts with ``prefix`` are kept. ``wait_for`` polls until a condition on
    what was seen holds (exports reach the endpoint a report interval after they were set).
    """

    def __init__(self, urls: list[str], prefix: str = "ray_mmdc_", interval_s: float = 1.0) -> None:
        self.urls, self.prefix, self.interval_s = urls, prefix, interval_s
        self.latest: dict[Series, float] = {}
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-scraper", daemon=True)

    def start(self) -> MetricsScraper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.scrape()
            self._stop.wait(self.interval_s)

    def scrape(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        for url in self.urls:
            try:
                text = urllib.request.urlopen(url, timeout=5).read().decode()
            except OSError as err:  # a node going away, or the agent restarting: note it, keep going
                self.errors.append(f"{url}: {err}")
                continue
            seen = {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name.startswith(self.prefix)
            }
            with self._lock:
                self.latest.update(seen)

    def values(self, name: str, **labels: str) -> dict[frozenset, float]:
        """Latest value per series of ``name`` whose labels include ``labels`` (keyed by all its labels)."""
        want = set(labels.items())
        with self._lock:
            return {lbl: v for (n, lbl), v in self.latest.items() if n == name and want <= lbl}

    def wait_for(self, ready: Callable[[MetricsScraper], bool], timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not ready(self):
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)
        return True


@pytest.fixture(scope="session")
def _tiny_run_and_scraper(ray_cluster, tmp_path_factory):
    from mmdc.metrics import metrics_endpoints
    from mmdc.run import main

    scraper = MetricsScraper(metrics_endpoints()).start()
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    args = ["--output", str(run_dir)]
    for o in TINY_OVERRIDES:
        args += ["--set", o]
    try:
        assert main(args) == 0
        yield run_dir, scraper
    finally:
        scraper.stop()


@pytest.fixture(scope="session")
def tiny_run(_tiny_run_and_scraper) -> Path:
    """The run directory of one tiny MmDC run on the session cluster (run name: ``tiny``)."""
    return _tiny_run_and_scraper[0]


@pytest.fixture(scope="session")
def tiny_run_metrics(_tiny_run_and_scraper) -> MetricsScraper:
    """The scraper that watched the tiny run's metrics endpoints (still scraping until the session ends)."""
    return _tiny_run_and_scraper[1]


@pytest.fixture(scope="session")
def tiny_run_args() -> Callable[[Path], list[str]]:
    """``mmdc.run`` arguments for another run set up exactly like ``tiny_run``, into the given directory."""

    def args(run_dir: Path) -> list[str]:
        out = ["--output", str(run_dir)]
        for o in TINY_OVERRIDES:
            out += ["--set", o]
        return out

    return args


@pytest.fixture
def colour_pool() -> Callable[[Path, int], pa.Table]:
    """``make(image_dir, rows)``: ``rows`` questions over four plain-colour images written to ``image_dir``."""
    import pyarrow as pa
    from PIL import Image

    def make(image_dir: Path, rows: int) -> pa.Table:
        colours = [(230, 20, 20), (20, 200, 40), (30, 40, 220), (240, 220, 30)]
        for k, c in enumerate(colours):
            Image.new("RGB", (32, 32), c).save(image_dir / f"img{k}.png")
        return pa.table(
            {
                "instruction_id": [f"row{i:04d}" for i in range(rows)],
                "image": [f"img{i % len(colours)}.png" for i in range(rows)],
                "question": [f"what colour is shape {i}?" for i in range(rows)],
            }
        )

    return make
