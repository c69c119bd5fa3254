"""Phases as transactions, without Ray: state.json commits a phase only when it completes; done() skips it later."""

from __future__ import annotations

import json
import time

import pytest

from mmdc.actors.phases import PhaseLog
from mmdc.rundir import RunDir


def test_a_completed_phase_is_committed_with_its_metrics_line(tmp_path):
    run_dir = RunDir(tmp_path)
    said: list[str] = []
    state = {"status": "new", "completed": []}
    phases = PhaseLog(run_dir, state, said.append, cleanup=lambda: 0)
    assert not phases.done(1, "teach")
    with phases.run(1, "teach") as record:
        assert json.loads(run_dir.state_file.read_text())["current"]["phase"] == "teach"  # in progress, on disk
        record.update(rows=10, generated_tokens=40)
        time.sleep(0.01)  # wall_s is rounded to ms: rates need a measurable phase
    saved = json.loads(run_dir.state_file.read_text())
    assert [(c["iteration"], c["phase"], c["rows"]) for c in saved["completed"]] == [(1, "teach", 10)]
    assert "current" not in saved and saved["status"] == "running"
    line = run_dir.read_metrics()[-1]
    assert line["phase"] == "teach" and line["rows_per_s"] > 0 and line["gen_tokens_per_s"] > 0
    assert phases.done(1, "teach") and "completed by an earlier attempt" in said[-1]


def test_a_failed_phase_stays_current_and_is_not_committed(tmp_path):
    run_dir = RunDir(tmp_path)
    state = {"status": "new", "completed": []}
    phases = PhaseLog(run_dir, state, lambda message: None, cleanup=lambda: 2)
    with pytest.raises(RuntimeError), phases.run(1, "tune"):
        raise RuntimeError("worker died")
    saved = json.loads(run_dir.state_file.read_text())
    assert saved["completed"] == [] and saved["current"]["phase"] == "tune"  # a resume reruns it
    assert not phases.done(1, "tune") and run_dir.read_metrics() == []
