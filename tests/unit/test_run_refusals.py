"""``mmdc.run`` refuses what cannot work before Ray starts, in one line naming the key, file or holder; a run that
fails says why in one line and where its full log is (no Ray: the refusals come first, the rest is faked)."""

from __future__ import annotations

import pytest

from mmdc.config import dump_config, load_config
from mmdc.run import failed, failure_reason, main
from mmdc.rundir import RunLock


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Any of these tests reaching Ray is a failure: the refusal must come first."""
    import mmdc.run

    def connect(*_args, **_kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(mmdc.run, "connect_ray", connect)


def refusal(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    return err


@pytest.mark.parametrize(
    "override, key",
    [
        ("calibration.tau=nan", "calibration.tau"),
        ("pipeline.batch_size=0", "pipeline.batch_size"),
        ("tune.num_workers=0", "tune.num_workers"),
        ("tune.micro_batch_size=0", "tune.micro_batch_size"),
        ("data.max_instructions=-1", "data.max_instructions"),
    ],
)
def test_a_bad_value_is_refused_naming_the_key(capsys, tmp_path, override, key):
    err = refusal(capsys, ["--output", str(tmp_path / "run"), "--set", override])
    assert err.startswith("mmdc: config error:") and f"'{key}'" in err
    assert not (tmp_path / "run").exists()


def test_missing_input_files_are_refused_naming_the_key(capsys, tmp_path):
    err = refusal(
        capsys,
        [
            "--output",
            str(tmp_path / "run"),
            "--set",
            "eval.enabled=false",
            "--set",
            "data.source=llava",
            "--set",
            f"data.instructions={tmp_path}/i.json",
        ],
    )
    assert f"data.instructions: {tmp_path}/i.json is not there" in err and "data.image_folder is not set" in err


def test_a_corrupt_state_file_is_refused_naming_it(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dump_config(load_config(None, []), run_dir / "config.yaml")
    (run_dir / "state.json").write_text('{"completed": [')
    err = refusal(capsys, ["--resume", str(run_dir)])
    assert f"{run_dir / 'state.json'} is corrupt" in err


@pytest.mark.parametrize("resume", [False, True])
def test_a_directory_with_a_live_run_is_refused_naming_the_holder(capsys, tmp_path, resume):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dump_config(load_config(None, []), run_dir / "config.yaml")
    with RunLock(run_dir) as held:
        argv = ["--resume", str(run_dir)] if resume else ["--output", str(run_dir), "--set", "run.overwrite=true"]
        err = refusal(capsys, argv)
        assert "in use by a live run" in err and f"host {held.host}, pid" in err and "started" in err
        held.verify()  # the refused run left the lock alone


def test_a_failed_run_says_why_in_one_line_and_logs_the_traceback(capsys, tmp_path):
    class Wrapped(RuntimeError):  # what ray.get raises for an exception in the driver: RayTaskError(cause)
        def __init__(self, cause: BaseException) -> None:
            super().__init__("ray::Driver.run() (pid=1)\n  File x\nValueError: no usable instruction")
            self.cause = cause

    try:
        raise Wrapped(ValueError("no usable instruction in /d/i.json"))
    except Wrapped as err:
        assert failed(err, tmp_path) == 1
    err_line = capsys.readouterr().err.strip()
    assert err_line == (
        f"mmdc: run failed: ValueError: no usable instruction in /d/i.json (full log: {tmp_path / 'driver.log'})"
    )
    log = (tmp_path / "driver.log").read_text()
    assert "Traceback" in log and "ray::Driver.run()" in log


def test_failure_reason_of_a_quoted_traceback_is_its_last_line():
    died = RuntimeError(
        "The actor died because of an error raised in its creation task, ray::Driver.__init__()\n"
        "Traceback (most recent call last):\n  File 'x', line 1\nmmdc.rundir.LockLost: run directory /r: gone"
    )
    assert failure_reason(died) == "mmdc.rundir.LockLost: run directory /r: gone"
    assert failure_reason(KeyError("state")) == "KeyError: 'state'"
