"""The run directory: one folder that holds everything a run produced, and the only place it writes.

    runs/<name>/
      config.yaml  state.json  metrics.jsonl  report.md  skipped.jsonl
      data/                         generated data set (embedded default) and its images
      pools/iter_<k>/tuning.parquet pools/iter_<k>/cache.parquet
      answers/teacher/*.parquet     the frozen teacher's answer store (key -> answer)
      answers/iter_<k>/<phase>/     raw phase outputs
      train/iter_<k>/conversations.parquet
      assessments/iter_<k>.parquet  generated/iter_<k>.parquet
      checkpoints/align/  checkpoints/student/iter_<k>/

Writes are atomic (temp file, then rename) so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


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
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {"status": "new", "completed": []}

    def save_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.state_file, json.dumps(state, indent=2, default=str))


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
