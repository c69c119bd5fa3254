"""Where an attempt of a run starts (``RunDir.begin_attempt``): a new state or the saved one; the config written and
a crashed attempt's unfinished answer rows dropped only when the config may have changed."""

from __future__ import annotations

from mmdc.config import Config, load_config
from mmdc.rundir import RunDir


def crashed_rows(run: RunDir):
    tmp = run.root / "answers" / "iter_1" / "teach_teacher.tmp"
    tmp.mkdir(parents=True)
    (tmp / "part-0.parquet").write_bytes(b"rows")
    return tmp


def test_a_new_run_writes_its_config_and_starts_empty(tmp_path):
    run = RunDir(tmp_path / "run")
    tmp = crashed_rows(run)
    state = run.begin_attempt(Config(), resume=False, forced=[])
    assert state == {"status": "new", "completed": []}
    assert load_config(run.config).run.seed == Config().run.seed and not tmp.exists()


def test_a_plain_resume_keeps_the_state_config_and_rows(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_state({"status": "running", "completed": [{"iteration": 0, "phase": "prepare"}]})
    tmp = crashed_rows(run)
    state = run.begin_attempt(Config(), resume=True, forced=[])
    assert state["completed"] == [{"iteration": 0, "phase": "prepare"}]
    assert tmp.exists() and not run.config.exists()  # mmdc.run checked the saved config: nothing is rewritten


def test_a_forced_resume_rewrites_the_config_drops_rows_and_records_the_keys(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_state({"status": "running", "completed": []})
    tmp = crashed_rows(run)
    cfg = Config()
    cfg.tune.lr = 1e-3
    state = run.begin_attempt(cfg, resume=True, forced=["tune.lr"])
    assert not tmp.exists() and load_config(run.config).tune.lr == 1e-3
    assert [change["keys"] for change in state["forced_changes"]] == [["tune.lr"]]
