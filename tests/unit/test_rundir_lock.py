"""The run-directory lock: one live run per directory; a dead holder's lock is taken over; a lost lock is noticed.

Other hosts are simulated by writing their lock file; a dead process is a child that has exited.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from mmdc.rundir import (
    LOCK_FILE,
    CorruptState,
    LockHolder,
    LockLost,
    RunDir,
    RunLock,
    RunLocked,
    read_lock,
    verify_lock,
)


def write_holder(root, **changes) -> LockHolder:
    """A lock file as another run would have written it (this host and this pid unless changed)."""
    holder = LockHolder("this-host", os.getpid(), time.time() - 60, time.time(), "their-token")
    holder = dataclasses.replace(holder, **changes)
    root.mkdir(parents=True, exist_ok=True)
    (root / LOCK_FILE).write_text(json.dumps(dataclasses.asdict(holder)))
    return holder


def lock(root, **kwargs) -> RunLock:
    said: list[str] = []
    run_lock = RunLock(root, say=said.append, **kwargs)
    run_lock.said = said  # type: ignore[attr-defined]
    return run_lock


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_lock_on_a_live_directory_is_refused_naming_the_holder(tmp_path):
    first = lock(tmp_path / "run").acquire()
    holder = read_lock(tmp_path / "run" / LOCK_FILE)
    assert (holder.host, holder.pid, holder.token) == (first.host, os.getpid(), first.token)
    with pytest.raises(RunLocked) as err:
        lock(tmp_path / "run").acquire()
    message = str(err.value)
    assert str(tmp_path / "run") in message and f"pid {os.getpid()}" in message and first.host in message
    assert "started " in message
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    lock(tmp_path / "run").acquire().release()  # free again


def test_a_lock_whose_process_is_gone_is_taken_over_with_a_message(tmp_path):
    run_lock = lock(tmp_path)
    write_holder(tmp_path, host=run_lock.host, pid=dead_pid(), pid_namespace=_namespace())
    with run_lock:
        assert read_lock(tmp_path / LOCK_FILE).token == run_lock.token
        assert any("taking over" in line and "is gone" in line for line in run_lock.said)
    assert not list(tmp_path.glob(f"{LOCK_FILE}*"))  # nothing left aside


def test_a_reused_pid_is_not_the_holder(tmp_path):
    run_lock = lock(tmp_path)
    write_holder(tmp_path, host=run_lock.host, pid=os.getpid(), pid_start="1", pid_namespace=_namespace())
    with run_lock:  # this pid is alive, but it started at another time: not the holder
        assert read_lock(tmp_path / LOCK_FILE).token == run_lock.token


def test_another_hosts_lock_counts_by_its_heartbeat(tmp_path):
    write_holder(tmp_path, host="gpu-node-7", pid=1, heartbeat=time.time() - 30)
    with pytest.raises(RunLocked, match="host gpu-node-7, pid 1"):
        lock(tmp_path, stale_after_s=120).acquire()
    write_holder(tmp_path, host="gpu-node-7", pid=1, heartbeat=time.time() - 300)
    with lock(tmp_path, stale_after_s=120) as run_lock:
        assert read_lock(tmp_path / LOCK_FILE).host == run_lock.host
        assert any("gpu-node-7" in line for line in run_lock.said)


def test_the_holder_heartbeats_and_notices_a_take_over(tmp_path):
    run_lock = lock(tmp_path, heartbeat_s=0.05).acquire()
    first = read_lock(tmp_path / LOCK_FILE).heartbeat
    time.sleep(0.3)
    assert read_lock(tmp_path / LOCK_FILE).heartbeat > first
    verify_lock(tmp_path, run_lock.token)
    write_holder(tmp_path, host="elsewhere", token="new-owner")  # taken over (say, after a long stall)
    with pytest.raises(LockLost, match="no longer this run's"):
        verify_lock(tmp_path, run_lock.token)
    time.sleep(0.3)
    assert any("lost the lock" in line for line in run_lock.said)
    assert read_lock(tmp_path / LOCK_FILE).token == "new-owner"  # the heartbeat did not write over it
    run_lock.release()
    assert read_lock(tmp_path / LOCK_FILE).token == "new-owner"  # nor did the release remove it


def test_an_unreadable_lock_is_alive_while_fresh_and_taken_over_when_old(tmp_path):
    (tmp_path / LOCK_FILE).write_text("")
    with pytest.raises(RunLocked, match="unreadable lock"):
        lock(tmp_path).acquire()
    old = time.time() - 600
    os.utime(tmp_path / LOCK_FILE, (old, old))
    with lock(tmp_path) as run_lock:
        assert read_lock(tmp_path / LOCK_FILE).token == run_lock.token


def test_a_corrupt_state_file_names_the_file(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.state_file.write_text('{"status": "running", "completed": [')
    with pytest.raises(CorruptState) as err:
        run_dir.load_state()
    assert str(run_dir.state_file) in str(err.value)
    run_dir.state_file.write_bytes(b"\xff\xfe")
    with pytest.raises(CorruptState, match="state.json"):
        run_dir.load_state()
    run_dir.state_file.write_text("[]")
    with pytest.raises(CorruptState, match="not a run state"):
        run_dir.load_state()


def _namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def test_an_acquired_lock_used_as_a_context_is_held_once_and_released(tmp_path):
    with lock(tmp_path).acquire() as run_lock:
        assert read_lock(tmp_path / LOCK_FILE).token == run_lock.token
    assert not (tmp_path / LOCK_FILE).exists()
