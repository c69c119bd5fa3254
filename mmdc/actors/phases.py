"""Phases as transactions: ``state.json`` is the commit record, and every phase leaves one metrics line.

A phase counts as done only once its outputs are in place and it is listed in ``state["completed"]``;
``done`` tells a resumed driver to skip it. ``run`` times a phase, records where the run stands
(``state["current"]``, the Prometheus gauges), and on success appends the phase's record to
``metrics.jsonl`` and commits it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mmdc import metrics
from mmdc.actors.cleanup import remove_orphaned_placement_groups
from mmdc.rundir import RunDir


class PhaseLog:
    """The phases of one run: ``state`` is the driver's own dict, saved to ``run_dir``'s state.json on every change.

    ``cleanup`` runs before each phase and returns how many leftovers it removed (the placement groups of a crashed
    attempt's trainer, which would hold its resources). ``guard`` runs before that and raises when the phase must
    not start (the run no longer holds its directory's lock).
    """

    def __init__(
        self,
        run_dir: RunDir,
        state: dict,
        announce: Callable[[str], None],
        cleanup: Callable[[], int] = remove_orphaned_placement_groups,
        guard: Callable[[], None] = lambda: None,
    ) -> None:
        self.run_dir, self.state, self.announce, self.cleanup = run_dir, state, announce, cleanup
        self.guard = guard
        self.dashboard = metrics.dashboard_url()  # shown in every phase line, for the operator following the log

    def done(self, iteration: int, name: str) -> bool:
        """True when an earlier attempt completed this phase (then the caller skips it)."""
        finished = any(c["iteration"] == iteration and c["phase"] == name for c in self.state["completed"])
        if finished:
            self.announce(f"iteration {iteration} · {name}: completed by an earlier attempt, skipped")
        return finished

    @contextmanager
    def run(self, iteration: int, name: str, **extra: Any) -> Iterator[dict]:
        """Time a phase, log its metrics line and record it in state.json when it completes."""
        self.guard()
        run_name = self.run_dir.root.name
        self.announce(f"iteration {iteration} · {name} …")
        if removed := self.cleanup():  # a crashed attempt's trainer would hold its resources
            self.announce(f"removed {removed} placement group(s) left by a crashed attempt")
        self.state["current"] = {"iteration": iteration, "phase": name, "started": round(time.time(), 3)}
        self.state["status"] = "running"
        self.run_dir.save_state(self.state)
        metrics.publish_state(iteration, name, run=run_name)
        record: dict = {"iteration": iteration, "phase": name, **extra}
        start = time.perf_counter()
        yield record
        record["wall_s"] = round(time.perf_counter() - start, 3)
        if record.get("rows") and record["wall_s"] > 0:
            record["rows_per_s"] = round(record["rows"] / record["wall_s"], 3)
        if record.get("generated_tokens") and record["wall_s"] > 0:
            record["gen_tokens_per_s"] = round(record["generated_tokens"] / record["wall_s"], 3)
        self.run_dir.log_metrics(record)
        metrics.publish_phase(record, run=run_name)  # Ray dashboard / Prometheus
        self.state["completed"].append(
            {"iteration": iteration, "phase": name, "wall_s": record["wall_s"], "rows": record.get("rows")}
        )
        self.state.pop("current", None)
        self.run_dir.save_state(self.state)
        summary = ", ".join(f"{k}={v}" for k, v in record.items() if k not in ("iteration", "phase"))
        where = f" · dashboard {self.dashboard}" if self.dashboard else ""
        self.announce(f"iteration {iteration} · {name} done: {summary}{where}")
