"""The frozen teacher's answer store: every answer is asked for once, across phases, iterations and resumes.

The teacher never changes, so an answer is a function of (model, prompt, image, sampling, seed).
``answer_key`` hashes exactly that; ``AnswerStore`` keeps the answers under ``answers/teacher/`` of a
run directory, one Parquet file per (iteration, phase) that asked for new ones. The key column is
``cache_key`` on disk (the name runs have always written, so old run directories still resume).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from mmdc import roles
from mmdc.config import Config, to_dict
from mmdc.data.images import image_sha256, resolve_image
from mmdc.rundir import atomic_write_table

KEY_COLUMN = "cache_key"


def model_fingerprint(model_dir: str) -> str:
    """A cheap identity for a frozen model: config, file names and sizes, and the weights' first MiB.

    Hashing full 13B weights would take minutes; the config plus per-file size and head hash changes
    whenever the weights are retrained or swapped. A hub id (not a folder) is its own identity.
    """
    root = Path(model_dir)
    digest = hashlib.sha256()
    if not root.is_dir():
        digest.update(model_dir.encode())
        return digest.hexdigest()[:16]
    for path in sorted(root.iterdir()):
        if not path.is_file():
            continue
        digest.update(path.name.encode())
        digest.update(str(path.stat().st_size).encode())
        with path.open("rb") as handle:
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def _canonical_numbers(value: Any) -> Any:
    """Sampling params with every number as a float, so temperature 1 and 1.0 give the same key."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"answer_key: sampling value {value!r} is not finite")
        return number
    if isinstance(value, dict):
        return {str(k): _canonical_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical_numbers(v) for v in value]
    raise TypeError(f"answer_key: sampling value of type {type(value).__name__} is not JSON data")


def answer_key(
    model_fingerprint: str,
    messages_without_image: list[dict[str, Any]],
    image_sha256: str,
    sampling: dict[str, Any],
    seed: int,
) -> str:
    """sha256 hex of the canonical JSON of everything a frozen teacher's answer depends on.

    The image enters through ``image_sha256`` only: image parts of the messages are replaced by a
    placeholder first (``roles.messages_without_images``), so the same picture under another URL or
    path gives the same key. Key order in dicts does not matter, nor does writing a sampling number
    as int or float.
    """
    payload = {
        "model": model_fingerprint,
        "messages": roles.messages_without_images(messages_without_image),
        "image_sha256": image_sha256.lower(),
        "sampling": _canonical_numbers(sampling),
        "seed": int(seed),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class AnswerStore:
    """The teacher's answers in ``folder`` (``answers/teacher/``), looked up by ``answer_key``.

    ``sampling`` is the teacher role's sampling config (temperature, max_new_tokens); each row's seed is
    ``roles.row_seed(run_seed, "teacher", instruction_id)``, so an instruction is always answered alike.
    """

    def __init__(
        self, folder: Path, model_fingerprint: str, sampling: dict[str, Any], run_seed: int, image_root: str | None
    ) -> None:
        self.folder, self.model_fingerprint = Path(folder), model_fingerprint
        self.sampling = {k: v for k, v in sampling.items() if k != "retries"}  # retries never change an answer
        self.run_seed, self.image_root = run_seed, image_root
        self._image_sha: dict[str, str] = {}

    @classmethod
    def of_run(cls, folder: Path, teacher: str, cfg: Config, image_root: str | None) -> AnswerStore:
        """A run's store: answers of the checkpoint ``teacher`` under the teacher role's sampling and the run's seed."""
        return cls(folder, model_fingerprint(teacher), to_dict(cfg.roles.teacher), cfg.run.seed, image_root)

    def image_sha(self, image: str) -> str:
        if image not in self._image_sha:
            self._image_sha[image] = image_sha256(resolve_image(image, self.image_root))
        return self._image_sha[image]

    def with_keys(self, rows: pd.DataFrame) -> pd.DataFrame:
        """``rows`` (instruction_id, image, question) with their answer key in ``cache_key``."""
        rows = rows.copy()
        rows[KEY_COLUMN] = [
            answer_key(
                self.model_fingerprint,
                roles.teacher_messages(question, "<image>"),
                self.image_sha(image),
                self.sampling,
                roles.row_seed(self.run_seed, roles.Role.TEACHER.value, instruction_id),
            )
            for question, image, instruction_id in zip(rows["question"], rows["image"], rows["instruction_id"])
        ]
        return rows

    def load(self) -> pd.DataFrame:
        """Every stored answer, indexed by key (columns ``teacher_answer``, ``teacher_tokens``)."""
        files = sorted(self.folder.glob("*.parquet"))
        if not files:
            return pd.DataFrame({"teacher_answer": pd.Series(dtype=str)}, index=pd.Index([], name=KEY_COLUMN))
        stored = pd.concat([pd.read_parquet(f) for f in files]).drop_duplicates(KEY_COLUMN)
        return stored.set_index(KEY_COLUMN)

    def add(self, answered: pd.DataFrame, name: str) -> pd.DataFrame:
        """Store the new answers of ``answered`` as ``<name>.parquet``; returns them indexed by key."""
        new = answered[[KEY_COLUMN, "teacher_answer", "teacher_tokens"]].drop_duplicates(KEY_COLUMN)
        atomic_write_table(
            self.folder / f"{name}.parquet", pa.Table.from_pandas(new.sort_values(KEY_COLUMN), preserve_index=False)
        )
        return new.set_index(KEY_COLUMN)

    def answer(
        self, rows: pd.DataFrame, ask: Callable[[pd.DataFrame], pd.DataFrame], name: str
    ) -> tuple[pd.DataFrame, dict[str, int]]:
        """``rows`` with ``cache_key`` and ``teacher_answer``; only the keys never stored before go to ``ask``
        (which returns them with ``teacher_answer`` and ``teacher_tokens``) and are stored as ``name``."""
        keyed = self.with_keys(rows)
        stored = self.load()
        misses = keyed[~keyed[KEY_COLUMN].isin(stored.index)]
        stats = {"cache_hits": len(keyed) - len(misses), "cache_misses": len(misses)}
        if len(misses):
            new = self.add(ask(misses), name)
            stats["generated_tokens"] = int(new["teacher_tokens"].sum())
            stored = pd.concat([stored, new])  # misses are new keys: no re-read of the store
        keyed["teacher_answer"] = keyed[KEY_COLUMN].map(stored["teacher_answer"])
        return keyed, stats
