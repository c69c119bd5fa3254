"""Kill a run in the middle of a training phase and again in the middle of an inference phase,
resume it each time, and check it ends exactly where an uninterrupted run ends (issue 6).

"Kill" is ``ray.kill`` on the Driver actor: the job dies as it would on a preempted head, its Ray
Train workers and Ray Data clients with it, while Serve keeps the engine apps it had deployed (the
resumed driver removes them). The uninterrupted reference is the session's ``tiny_run``.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from mmdc.run import main
from mmdc.rundir import output_digests

pytestmark = pytest.mark.integration


def _state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _train_steps(run_dir: Path, stage: str) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if f'"stage": "{stage}"' in line and '"step"' in line)


def _partial_rows(run_dir: Path, phase_dir: str) -> int:
    return len(list((run_dir / "answers" / "iter_1" / f"{phase_dir}.tmp").glob("*.parquet")))


def _run_and_kill(ray, args: list[str], run_dir: Path, ready, timeout_s: float = 900) -> dict:
    """Start ``main(args)`` in a thread, kill the Driver actor once ``ready()`` holds; return the state then."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", main(args)), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert thread.is_alive(), f"the run ended (rc={result.get('rc')}) before the kill point"
        assert time.monotonic() < deadline, "the kill point was never reached"
        time.sleep(0.01)
    state = _state(run_dir)
    ray.kill(ray.get_actor(f"mmdc-driver-{run_dir.name}"), no_restart=True)
    thread.join(timeout=120)
    assert result.get("rc") == 1, "a killed run must fail"
    return state


def test_killed_twice_and_resumed_matches_the_uninterrupted_run(ray_cluster, tiny_run, tiny_run_args, tmp_path):
    ray = ray_cluster
    run_dir = tmp_path / "resumed"
    args = tiny_run_args(run_dir)

    # 1. Mid-training: after stage 2 has made at least one optimizer step.
    state = _run_and_kill(ray, args, run_dir, lambda: _train_steps(run_dir, "tune") >= 1)
    assert state["current"]["phase"] == "tune"
    assert "tune" not in [c["phase"] for c in state["completed"]]

    # 2. Resume; kill again mid-inference, once the assess phase has written some (not all) of its rows.
    state = _run_and_kill(ray, ["--resume", str(run_dir)], run_dir, lambda: _partial_rows(run_dir, "assess") >= 1)
    assert state["current"]["phase"] == "assess"
    assert "tune" in [c["phase"] for c in state["completed"]]

    # 3. Resume to the end; then resuming again is a no-op that says so.
    assert main(["--resume", str(run_dir)]) == 0
    final = _state(run_dir)
    assert final["status"] == "finished"
    phases = [(c["iteration"], c["phase"]) for c in final["completed"]]
    assert phases == [
        (0, "prepare"),
        (0, "align"),
        (0, "eval"),
        (0, "eval_teacher"),
        (1, "teach"),
        (1, "tune"),
        (1, "eval"),
        (1, "assess"),
        (1, "augment"),
    ]
    assert main(["--resume", str(run_dir)]) == 0
    assert _state(run_dir)["completed"] == final["completed"]

    # 4. Same pools, questions and assessments as the run that was never interrupted.
    want, got = output_digests(tiny_run), output_digests(run_dir)
    assert sorted(got) == sorted(want)
    assert [k for k in want if want[k] != got[k]] == []
