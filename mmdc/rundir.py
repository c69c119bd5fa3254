"""The run directory: one folder that holds everything a run produced, and the only place it writes.

    runs/<name>/
      config.yaml  state.json  metrics.jsonl  report.md  skipped.jsonl  driver.log  run.lock
      data/                         generated data set (embedded default) and its images
      pools/iter_<k>/tuning.parquet pools/iter_<k>/cache.parquet
      answers/teacher/*.parquet     the frozen teacher's answer store (key -> answer)
      answers/iter_<k>/<phase>/     raw phase outputs
      train/iter_<k>/conversations.parquet
      assessments/iter_<k>.parquet  generated/iter_<k>.parquet
      checkpoints/align/  checkpoints/student/iter_<k>/

Writes are atomic (temp file, then rename) so a crash never leaves a file that looks complete. ``RunLock``
keeps a second run out of a directory whose run is alive (``run.lock``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmdc.config import Config, dump_config


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class RunDir:
    """Paths and small writers for one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # layout ---------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def skipped(self) -> Path:
        return self.root / "skipped.jsonl"

    @property
    def log_file(self) -> Path:
        """The driver's log: its progress lines, warnings, and the traceback of a failed run."""
        return self.root / "driver.log"

    @property
    def lock_file(self) -> Path:
        """Who runs in this directory now (``RunLock``)."""
        return self.root / LOCK_FILE

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def answer_store(self) -> Path:
        """The frozen teacher's answers (``mmdc.data.answers.AnswerStore``)."""
        return self.root / "answers" / "teacher"

    def pool(self, iteration: int, name: str) -> Path:
        return self.root / "pools" / f"iter_{iteration}" / f"{name}.parquet"

    def phase_output(self, iteration: int, phase: str) -> Path:
        return self.root / "answers" / f"iter_{iteration}" / phase

    def conversations(self, iteration: int) -> Path:
        return self.root / "train" / f"iter_{iteration}" / "conversations.parquet"

    def assessment(self, iteration: int) -> Path:
        return self.root / "assessments" / f"iter_{iteration}.parquet"

    def generated(self, iteration: int) -> Path:
        return self.root / "generated" / f"iter_{iteration}.parquet"

    def checkpoint_init(self) -> Path:
        """The student assembled from its parts (``models.student_init: assemble``), before any training."""
        return self.root / "checkpoints" / "student" / "init"

    def checkpoint(self, iteration: int | None) -> Path:
        """``None`` is the stage 1 (alignment) checkpoint."""
        if iteration is None:
            return self.root / "checkpoints" / "align"
        return self.root / "checkpoints" / "student" / f"iter_{iteration}"

    # writers --------------------------------------------------------------------------------
    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line; each line is one phase (or one training step) of one iteration."""
        self.metrics.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}, default=str) + "\n")

    def log_skips(self, skips: list[dict[str, Any]]) -> None:
        """Bad input is recorded with its reason, never dropped silently."""
        if not skips:
            return
        with self.skipped.open("a") as f:
            for s in skips:
                f.write(json.dumps(s, default=str) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def load_state(self) -> dict[str, Any]:
        """The run's state.json (a new state when there is none); CorruptState naming the file when it does not read."""
        if not self.state_file.exists():
            return {"status": "new", "completed": []}
        try:
            state = json.loads(self.state_file.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptState(str(self.state_file), str(err)) from None
        if not isinstance(state, dict) or not isinstance(state.get("completed"), list):
            raise CorruptState(str(self.state_file), "not a run state (no 'completed' list of phases)")
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.state_file, json.dumps(state, indent=2, default=str))

    def begin_attempt(self, cfg: Config, resume: bool, forced: list[str]) -> dict[str, Any]:
        """The state this attempt starts from (state.json's when resuming). A new run, or one resumed with the
        config keys ``forced`` changed, writes ``cfg`` to config.yaml and drops the answer rows a crashed attempt
        left (made under another config); forced keys are recorded in ``state["forced_changes"]``."""
        state = self.load_state() if resume else {"status": "new", "completed": []}
        if not resume or forced:
            dump_config(cfg, self.config)
            for tmp in self.root.glob("answers/iter_*/*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
        if forced:
            state.setdefault("forced_changes", []).append({"time": time.time(), "keys": list(forced)})
        return state


def attach_log(path: Path) -> None:
    """Write this process's mmdc log to ``path`` (appending): every ``mmdc.driver`` record from INFO up (the driver's
    progress lines; not echoed anywhere else) and every other mmdc warning. Idempotent."""
    import logging

    target = str(path.resolve())
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, level in (("mmdc.driver", logging.INFO), ("mmdc", logging.WARNING)):
        logger = logging.getLogger(name)
        if any(getattr(h, "baseFilename", None) == target for h in logger.handlers):
            continue
        handler = logging.FileHandler(target, encoding="utf-8")
        handler.setLevel(level)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    driver = logging.getLogger("mmdc.driver")
    driver.setLevel(logging.INFO)
    driver.propagate = False  # its lines are already on stdout (announce); the file handler above keeps them


class CorruptState(ValueError):
    """A state.json that does not read as a run's state; names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"{path} is corrupt ({reason}); it records which phases finished, so the run cannot be resumed from it "
            "(restore it, or start a new run)"
        )
        self.path, self.reason = path, reason

    def __reduce__(self):  # rebuilt from its fields when it crosses Ray
        return type(self), (self.path, self.reason)


# --------------------------------------------------------------------------------------------
# The run-directory lock
# --------------------------------------------------------------------------------------------

LOCK_FILE = "run.lock"


@dataclass(frozen=True)
class LockHolder:
    """What a lock file says: who holds it, since when, and when it last proved to be alive (epoch seconds)."""

    host: str
    pid: int
    started: float
    heartbeat: float
    token: str  # unique per acquisition: the holder knows the lock is still its own
    pid_start: str | None = None  # the process's start time (/proc), so a reused pid is not mistaken for the holder
    pid_namespace: str | None = None  # containers sharing a host name have their own pids: only a shared one counts

    def describe(self, now: float | None = None) -> str:
        age = (now or time.time()) - self.heartbeat
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"host {self.host}, pid {self.pid}, started {started}, last heartbeat {age:.0f} s ago"


class RunLocked(RuntimeError):
    """The run directory belongs to a run that is alive; names the directory and the holder."""

    def __init__(self, root: str, holder: str) -> None:
        super().__init__(
            f"run directory {root} is in use by a live run ({holder}); wait for it to end or stop it first "
            f"(if that process is gone and its lock is not, delete {Path(root) / LOCK_FILE})"
        )
        self.root, self.holder = root, holder

    def __reduce__(self):  # rebuilt from its fields when it crosses Ray
        return type(self), (self.root, self.holder)


class LockLost(RuntimeError):
    """This run no longer holds its directory's lock (another run took it over): it must stop writing there."""

    def __init__(self, root: str, holder: str) -> None:
        super().__init__(f"run directory {root}: the lock is no longer this run's ({holder}); stopping")
        self.root, self.holder = root, holder

    def __reduce__(self):  # rebuilt from its fields when it crosses Ray
        return type(self), (self.root, self.holder)


def _pid_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None where /proc does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name in parentheses may hold spaces


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int, pid_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return pid_start is None or _pid_start(pid) in (None, pid_start)


def read_lock(path: Path) -> LockHolder | None:
    """The holder a lock file names; None when there is no lock file, or it is empty or unreadable."""
    try:
        fields = json.loads(path.read_bytes())
        return LockHolder(**fields)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return None


class RunLock:
    """At most one live run per run directory, on local disk and on shared storage (NFS) alike.

    The lock is ``run.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local file systems and NFSv3+), holding
    the holder's host, pid, start time and a heartbeat the holder refreshes every ``heartbeat_s`` from a thread.
    A holder is dead when it is on this host (and pid namespace) and its pid is gone (or reused), or elsewhere and
    its heartbeat is older than ``stale_after_s`` (hosts' clocks must agree to well within that). A dead holder's
    lock is taken over with a message; a live one's is refused (``RunLocked``). The holder is ``mmdc.run``'s
    process, which owns the Driver actor (Ray ends the actor when its owner dies); the driver checks
    ``verify_lock`` before a phase and before deleting anything, so a run whose lock was taken over stops instead
    of writing beside the new one.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        heartbeat_s: float = 10.0,
        stale_after_s: float = 120.0,
        say: Callable[[str], None] = print,
    ) -> None:
        self.root = Path(root).resolve()
        self.path = self.root / LOCK_FILE
        self.heartbeat_s, self.stale_after_s, self.say = heartbeat_s, stale_after_s, say
        self.token = os.urandom(8).hex()
        self.host = socket.gethostname()
        self.started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        return self if self._thread is not None else self.acquire()  # ``with RunLock(d).acquire():`` holds it once

    def __exit__(self, *exc: object) -> None:
        self.release()

    def alive(self, holder: LockHolder, now: float | None = None) -> bool:
        """Whether ``holder`` still runs: its pid on this host (and pid namespace), its heartbeat from another."""
        if holder.host == self.host and holder.pid_namespace == _pid_namespace():
            return _pid_alive(holder.pid, holder.pid_start)
        return (now or time.time()) - holder.heartbeat <= self.stale_after_s

    def acquire(self) -> RunLock:
        """Take the lock (taking a dead holder's over) and start the heartbeat; RunLocked when a live run holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.started = time.time()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_dead()
                continue
            with os.fdopen(fd, "w") as file:
                file.write(self._content())
                file.flush()
                os.fsync(file.fileno())
            self._thread = threading.Thread(target=self._beat, name="mmdc-run-lock", daemon=True)
            self._thread.start()
            return self
        raise RunLocked(str(self.root), "several runs are starting in it at once")

    def _take_over_if_dead(self) -> None:
        """Remove the lock when its holder is dead (RunLocked when alive); a lock being written counts as alive."""
        holder = read_lock(self.path)
        for _ in range(10):  # a holder between creating the file and writing it: give it a moment
            if holder is not None or not self.path.exists():
                break
            time.sleep(0.1)
            holder = read_lock(self.path)
        if holder is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return  # gone meanwhile: try again
            if age <= self.stale_after_s:
                raise RunLocked(str(self.root), f"an unreadable lock written {age:.0f} s ago")
            self.say(f"[mmdc] taking over {self.path}: unreadable and {age:.0f} s old")
            self._remove(None)
            return
        if self.alive(holder):
            raise RunLocked(str(self.root), holder.describe())
        self.say(f"[mmdc] taking over the run directory lock from a run that is gone ({holder.describe()})")
        self._remove(holder.token)

    def _remove(self, token: str | None) -> None:
        """Move the lock file aside and delete it, unless (a race) it is no longer the one judged dead: then put it
        back, so the run that took it first keeps it."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = read_lock(aside)
        if token is not None and (moved is None or moved.token != token):
            try:
                os.link(aside, self.path)  # atomic: fails when a lock is there again
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    def _content(self) -> str:
        pid = os.getpid()
        holder = LockHolder(self.host, pid, self.started, time.time(), self.token, _pid_start(pid), _pid_namespace())
        return json.dumps(dataclasses.asdict(holder))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = read_lock(self.path)
                if holder is None or holder.token != self.token:
                    self.say(f"[mmdc] lost the lock of {self.root} ({holder.describe() if holder else 'removed'})")
                    return
                atomic_write_text(self.path, self._content())
            except OSError:  # a storage hiccup: the next beat tries again
                continue

    def verify(self) -> None:
        """LockLost unless the lock file is still this lock's."""
        verify_lock(self.root, self.token)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this lock's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder = read_lock(self.path)
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)


def verify_lock(root: str | Path, token: str) -> None:
    """LockLost unless ``root``'s lock holds ``token`` (what the Driver checks before a phase or a deletion)."""
    holder = read_lock(Path(root) / LOCK_FILE)
    if holder is None or holder.token != token:
        raise LockLost(str(root), holder.describe() if holder else "no lock file")


# Outputs whose content must not depend on crashes and resumes (README, "Reliability").
DETERMINISTIC_OUTPUTS = (
    "pools/iter_*/*.parquet",
    "train/iter_*/conversations.parquet",
    "assessments/*.parquet",
    "generated/*.parquet",
    "answers/teacher/*.parquet",
)
_SORT_KEYS = ("instruction_id", "cache_key")


def table_digest(path: Path) -> str:
    """sha256 of a Parquet file's rows, independent of file layout, row groups and pandas metadata."""
    import hashlib

    import pyarrow.ipc as ipc

    table = pq.read_table(path)
    keys = [k for k in _SORT_KEYS if k in table.column_names]
    if keys:
        table = table.sort_by([(k, "ascending") for k in keys])
    table = table.replace_schema_metadata(None).combine_chunks()
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def output_digests(root: str | Path) -> dict[str, str]:
    """``{relative path: table_digest}`` of a run's deterministic outputs, to compare two runs."""
    root = Path(root)
    return {
        str(p.relative_to(root)): table_digest(p)
        for pattern in DETERMINISTIC_OUTPUTS
        for p in sorted(root.glob(pattern))
    }
