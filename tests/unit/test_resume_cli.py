"""``--resume``: which config a resumed run uses, and refusing a changed one unless forced (no Ray)."""

from __future__ import annotations

import pytest

from mmdc.config import Config, ConfigError, diff_configs, dump_config, load_config
from mmdc.run import parse_args, resume_config


def test_diff_configs_names_dotted_keys():
    a, b = Config(), Config()
    assert diff_configs(a, b) == []
    b.calibration.tau = 0.5
    b.tune.lora.r = 8
    b.engines["teacher"].replicas = 2
    assert diff_configs(a, b) == ["calibration.tau", "engines.teacher.replicas", "tune.lora.r"]


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    dump_config(load_config(None, ["run.iterations=2", "calibration.tau=0.33"]), d / "config.yaml")
    return d


def test_resume_uses_the_saved_config(run_dir):
    cfg, changed = resume_config(parse_args(["--resume", str(run_dir)]))
    assert cfg.run.iterations == 2 and changed == []


def test_resume_with_a_changed_key_is_refused_naming_it(run_dir):
    with pytest.raises(ConfigError, match=r"calibration\.tau.*--force"):
        resume_config(parse_args(["--resume", str(run_dir), "--set", "calibration.tau=0.5"]))


def test_resume_with_force_accepts_and_reports_the_change(run_dir):
    cfg, changed = resume_config(parse_args(["--resume", str(run_dir), "--set", "calibration.tau=0.5", "--force"]))
    assert cfg.calibration.tau == 0.5 and changed == ["calibration.tau"]


def test_resume_with_the_same_value_is_not_a_change(run_dir):
    cfg, changed = resume_config(parse_args(["--resume", str(run_dir), "--set", "run.iterations=2"]))
    assert changed == []


def test_resume_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not an mmdc run directory"):
        resume_config(parse_args(["--resume", str(tmp_path)]))
