"""Pools as Ray Datasets and phase outputs as folders of Parquet blocks, written so a crash loses no finished row.

``dataset_from_table`` makes a Dataset without read tasks (which would wait for CPUs the engines or
trainers hold); ``write_blocks`` streams a Dataset to one Parquet file per block, each renamed into
place; ``resume_partial`` keeps the whole files a crashed attempt left and says which rows remain;
``find_problems`` maps a check (an image that will not load) over many values in parallel tasks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import ray


def dataset_from_table(table: pa.Table, num_blocks: int) -> ray.data.Dataset:
    """``table`` as a Ray Dataset of about ``num_blocks`` equal blocks, without any read task.

    ``from_blocks`` only puts the blocks in the object store: no listing or metadata tasks, which
    ``read_parquet`` plans and which each want a whole CPU; on a small cluster whose CPUs the engine
    replicas or trainer workers hold, such a task would wait forever.
    """
    import ray

    return ray.data.from_blocks(_split(table, num_blocks))


def _split(table: pa.Table, n: int) -> list[pa.Table]:
    n = max(1, min(n, table.num_rows))
    size = -(-table.num_rows // n)
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def write_blocks(ds: ray.data.Dataset, folder: Path) -> None:
    """Stream ``ds`` into ``folder``, one Parquet file per output block, written by this process.

    Not ``Dataset.write_parquet``: its write tasks start fresh worker processes during the phase, which
    take CPU from the engine replicas still generating (benchmarks/results/engine_throughput.md). Each
    file is written under a temporary name and renamed, so a crash leaves only whole files behind.
    """
    folder.mkdir(parents=True, exist_ok=True)
    attempt = os.urandom(4).hex()  # a resumed phase adds files beside the kept ones, never over them
    for i, block in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
        part = folder / f"{attempt}-{i:06d}.parquet"
        partial = part.with_name(part.name + ".partial")
        pq.write_table(block, partial)
        os.replace(partial, part)


def resume_partial(tmp: Path, table: pa.Table, id_column: str) -> tuple[int, pa.Table]:
    """Keep the complete files a crashed attempt left in ``tmp``; return (rows kept, rows still to do).

    A file that does not read back (cut off mid-write) is deleted; rows whose id is not in this
    attempt's input (the input changed) are dropped with their file, so nothing stale survives.
    """
    if not tmp.exists():
        return 0, table
    wanted = set(table.column(id_column).to_pylist()) if table.num_rows else set()
    kept: set = set()
    for f in sorted(tmp.glob("*.parquet")):
        try:
            ids = pq.read_table(f, columns=[id_column]).column(id_column).to_pylist()
        except Exception:  # noqa: BLE001 - any unreadable file is a partial write
            f.unlink()
            continue
        if not ids or not set(ids) <= wanted or kept & set(ids):
            f.unlink()
            continue
        kept |= set(ids)
    for f in tmp.iterdir():
        if f.suffix != ".parquet":
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    if not kept:
        return 0, table
    mask = pa.array([i not in kept for i in table.column(id_column).to_pylist()])
    return len(kept), table.filter(mask)


def read_folder(folder: str | Path) -> pa.Table:
    """All Parquet files of a folder as one table (file order is deterministic; callers sort by key)."""
    files = sorted(Path(folder).glob("*.parquet"))
    tables = [pq.read_table(f) for f in files]
    tables = [t for t in tables if t.num_rows] or tables[:1]
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def find_problems(
    values: list[str], check: Callable[[str], str | None], *, parallel: bool, values_per_task: int = 512
) -> dict[str, str]:
    """``{value: problem}`` for every distinct value whose ``check`` names a problem (None: no problem).

    ``parallel``: the checks run as Ray Data tasks of ``values_per_task`` values each, one CPU apiece, on
    whatever nodes have CPUs free (how 558K caption images are checked in minutes, not hours;
    benchmarks/results/image_check.md); otherwise, or when one task would hold them all, in this process.
    ``check`` must be picklable (a module-level function or a ``functools.partial`` of one). The answer is
    the same either way: it does not depend on order, batching or where a check ran.
    """
    distinct = list(dict.fromkeys(values))
    if not parallel or len(distinct) <= values_per_task:  # one task: no parallelism, only a Ray Data job's start
        return {value: problem for value in distinct if (problem := check(value)) is not None}
    blocks = -(-len(distinct) // values_per_task)
    dataset = dataset_from_table(pa.table({"value": pa.array(distinct, pa.string())}), blocks)
    checked = partial(_check_batch, check=check)
    found = dataset.map_batches(checked, batch_format="pyarrow", batch_size=None, num_cpus=1)
    return {row["value"]: row["problem"] for row in found.take_all()}


def _check_batch(batch: pa.Table, check: Callable[[str], str | None]) -> pa.Table:
    """The Ray Data function of ``find_problems``: the values of a batch that have a problem, with it."""
    found = [(value, problem) for value in batch.column("value").to_pylist() if (problem := check(value)) is not None]
    return pa.table(
        {
            "value": pa.array([value for value, _ in found], pa.string()),
            "problem": pa.array([problem for _, problem in found], pa.string()),
        }
    )
