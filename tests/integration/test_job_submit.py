"""``ray job submit -- python -m mmdc.run`` against a local head, as the README shows.

Starts its own head with ``ray start --head --block`` in a new process group (never ``ray stop``:
Ray's temp folder is shared by every process on the machine) with token auth, submits a
zero-iteration run (prepare + models only) and checks the job's final line names the run directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # The job's `python` must be this environment's, as after `source .venv/bin/activate`.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {
        **os.environ,
        "PATH": path,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,
        "OMP_NUM_THREADS": "1",
    }
    port, dash = _free_port(), _free_port()
    # Every listening port of its own: the session's test cluster (and anything else on the machine)
    # holds Ray's fixed defaults, e.g. the job agent's 52365, and a head whose job agent cannot bind
    # answers `job list` but refuses every submit ("No available agent").
    ports = [
        f"--{flag}={_free_port()}"
        for flag in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
        )
    ]
    proc = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dash}",
            *ports,
            "--dashboard-host=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        r = subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True, text=True)
        if r.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("local head did not come up:\n" + (tmp_path / "head.log").read_text()[-3000:])
    yield ray_bin, address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    _forget_head(port)


def _forget_head(port: int) -> None:
    """Remove the address file ``ray start`` wrote for this head, as ``ray stop`` would (it is never called here).

    Ray's address auto-detection reads that file, and Ray Train's placement-group cleaner asks the state API
    through it: left naming a dead head, every later trainer in the session waits 12 s for a GCS that is gone.
    """
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def test_ray_job_submit_runs_mmdc(head, tmp_path):
    ray_bin, address, env = head
    run_dir = tmp_path / "job-run"
    cmd = [
        ray_bin,
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "-m",
        "mmdc.run",
        "--output",
        str(run_dir),
        "--set",
        "run.iterations=0",
        "--set",
        "align.enabled=false",
        "--set",
        "data.world.num_images=6",
        "--set",
        "models.teacher=tiny:teacher-short",
    ]
    deadline = time.time() + 120
    while True:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        out = r.stdout + r.stderr
        # The dashboard answers `job list` before the node's job agent registers; a submit in that
        # window is refused without starting anything, so it is safe to send again.
        if "No available agent to submit job" not in out or time.time() > deadline:
            break
        time.sleep(3)
    assert r.returncode == 0, out[-4000:]
    assert f"mmdc: run directory: {run_dir}" in out
    assert (run_dir / "pools/iter_0/tuning.parquet").exists()
    assert (run_dir / "state.json").exists()
