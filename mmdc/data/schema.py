"""Arrow schemas for the instruction pools and folded conversations.

Every module that reads or writes a pool (the LLaVA loader, the augmentor's
pool update, the teach / assess pipelines) goes through the schemas here, so a
column typo or a wrong type fails loudly at the boundary, with the row index and
column name, instead of surfacing three phases later as a KeyError in a Ray task.

Ids are part of the contract too: an instruction id is a pure function of where
the question came from, so the same input data always produces the same ids and
a resumed run finds the rows it already processed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import pandas as pd
import pyarrow as pa

ORIGINS = ("seed", "generated")
IMAGE_POSITIONS = ("before", "after", "none")

# The pool row: one single-turn (image, question) instruction. Column order is the contract.
POOL_SCHEMA = pa.schema(
    [
        pa.field("instruction_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("origin", pa.string(), nullable=False),
        pa.field("parent_id", pa.string(), nullable=True),
        pa.field("iteration", pa.int32(), nullable=False),
        pa.field("turn", pa.int32(), nullable=False),
        pa.field("image_position", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
    ]
)

POOL_COLUMNS: tuple[str, ...] = tuple(POOL_SCHEMA.names)

# Answered single-turn items folded back into one multi-turn conversation per image (paper Eq. 1).
CONVERSATION_SCHEMA = pa.schema(
    [
        pa.field("conversation_id", pa.string(), nullable=False),  # = image_id
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),
        pa.field("questions", pa.list_(pa.string()), nullable=False),
        pa.field("answers", pa.list_(pa.string()), nullable=False),
        pa.field("instruction_ids", pa.list_(pa.string()), nullable=False),
    ]
)

_STR_COLUMNS = ("instruction_id", "image_id", "image", "question", "origin", "image_position", "source_id")
_INT_COLUMNS = ("iteration", "turn")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def seed_instruction_id(source_id: str, turn: int) -> str:
    """Id of a seed question: sha1 hex[:16] of "<source_id>:<turn>" (stable across runs and machines)."""
    return hashlib.sha1(f"{source_id}:{turn}".encode()).hexdigest()[:16]


def generated_instruction_id(parent_id: str, iteration: int, attempt: int) -> str:
    """Id of a generated question: sha1 hex[:16] of "<parent_id>:gen:<iteration>:<attempt>".

    ``attempt`` counts retries for the same parent in the same iteration, so a
    rejected first try and an accepted second try never share an id.
    """
    return hashlib.sha1(f"{parent_id}:gen:{iteration}:{attempt}".encode()).hexdigest()[:16]


def _check_columns(kind: str, index: int, row: Any, schema: pa.Schema) -> None:
    """Raise ValueError naming the row when it is not a dict with exactly ``schema``'s columns."""
    if not isinstance(row, dict):
        raise ValueError(f"{kind} row {index}: expected a dict, got {type(row).__name__}")
    missing = [name for name in schema.names if name not in row]
    if missing:
        raise ValueError(f"{kind} row {index}: missing column(s) {missing}")
    unknown = sorted(set(row) - set(schema.names))
    if unknown:
        raise ValueError(f"{kind} row {index}: unknown column(s) {unknown}; {kind} columns are {schema.names}")


def _check_row(index: int, row: Any) -> None:
    """Raise ValueError naming ``index`` and the column when ``row`` breaks the pool contract."""
    _check_columns("pool", index, row, POOL_SCHEMA)
    for name in _STR_COLUMNS:
        if not isinstance(row[name], str):
            raise ValueError(f"pool row {index}, column {name!r}: expected str, got {type(row[name]).__name__}")
    for name in _INT_COLUMNS:
        value = row[name]
        # bool is an int subclass; a True iteration is a bug, not a 1.
        if isinstance(value, bool) or not (isinstance(value, int) or _is_integral(value)):
            raise ValueError(f"pool row {index}, column {name!r}: expected int, got {type(value).__name__}")
        if not _INT32_MIN <= int(value) <= _INT32_MAX:
            raise ValueError(f"pool row {index}, column {name!r}: {value} does not fit int32")
    for name in ("instruction_id", "image_id", "image", "source_id"):
        if not row[name]:
            raise ValueError(f"pool row {index}, column {name!r}: must not be empty")
    if not row["question"].strip():
        raise ValueError(f"pool row {index}, column 'question': must not be empty or whitespace")
    if row["origin"] not in ORIGINS:
        raise ValueError(f"pool row {index}, column 'origin': {row['origin']!r} is not one of {ORIGINS}")
    if row["image_position"] not in IMAGE_POSITIONS:
        raise ValueError(
            f"pool row {index}, column 'image_position': {row['image_position']!r} is not one of {IMAGE_POSITIONS}"
        )
    parent = row["parent_id"]
    if row["origin"] == "seed":
        if parent is not None:
            raise ValueError(f"pool row {index}, column 'parent_id': a seed row has no parent, got {parent!r}")
        if int(row["iteration"]) != 0:
            raise ValueError(
                f"pool row {index}, column 'iteration': a seed row has iteration 0, got {row['iteration']}"
            )
    else:
        if not isinstance(parent, str) or not parent:
            raise ValueError(
                f"pool row {index}, column 'parent_id': a generated row needs its parent's id, got {parent!r}"
            )
        if int(row["turn"]) != -1:
            raise ValueError(f"pool row {index}, column 'turn': a generated row has turn -1, got {row['turn']}")


def _is_integral(value: Any) -> bool:
    """True for numpy-style integer scalars (they expose ``__index__``), false for floats and strings."""
    return hasattr(value, "__index__") and not isinstance(value, (str, bytes, float))


def pool_table(rows: Iterable[dict]) -> pa.Table:
    """Build a pool table from row dicts, validating every row against the contract.

    Raises ValueError naming the row index and the column for a missing or
    unknown column, a wrong type, an empty id, an unknown origin or image
    position, or seed / generated lineage that contradicts itself.
    """
    rows = list(rows)
    for index, row in enumerate(rows):
        _check_row(index, row)
    columns = {name: [row[name] for row in rows] for name in POOL_SCHEMA.names}
    for name in _INT_COLUMNS:
        columns[name] = [int(value) for value in columns[name]]
    return pa.Table.from_pydict(columns, schema=POOL_SCHEMA)


def empty_pool() -> pa.Table:
    """A pool with zero rows and the pool schema (so concatenation and Parquet writes keep the types)."""
    return POOL_SCHEMA.empty_table()


def check_pool(table: pa.Table, where: str = "pool") -> pa.Table:
    """Validate a pool read back from disk (e.g. Parquet) and return it cast to POOL_SCHEMA.

    ``where`` names the source (a file path) in the error. Column order may
    differ on input; the returned table has the contract's order. Row-level
    rules are re-checked, so a hand-edited Parquet file cannot smuggle in a
    seed with a parent.
    """
    missing = [name for name in POOL_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{where}: missing pool column(s) {missing}")
    unknown = sorted(set(table.column_names) - set(POOL_SCHEMA.names))
    if unknown:
        raise ValueError(f"{where}: unknown column(s) {unknown}")
    try:
        table = table.select(POOL_SCHEMA.names).cast(POOL_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"{where}: columns do not cast to the pool schema: {err}") from err
    try:
        for index, row in enumerate(table.to_pylist()):
            _check_row(index, row)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    return table


def conversation_table(rows: Iterable[dict]) -> pa.Table:
    """Build a conversation table; raises ValueError naming the row and column on a bad row.

    Questions, answers and instruction ids are parallel lists (turn t is index t),
    so their lengths must agree and must not be zero.
    """
    rows = list(rows)
    for index, row in enumerate(rows):
        _check_columns("conversation", index, row, CONVERSATION_SCHEMA)
        for name in ("conversation_id", "image_id", "image"):
            if not isinstance(row[name], str) or not row[name]:
                raise ValueError(f"conversation row {index}, column {name!r}: expected a non-empty str")
        lengths = set()
        for name in ("questions", "answers", "instruction_ids"):
            value = row[name]
            if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
                raise ValueError(f"conversation row {index}, column {name!r}: expected a list of str")
            lengths.add(len(value))
        if len(lengths) != 1:
            raise ValueError(f"conversation row {index}: questions, answers and instruction_ids differ in length")
        if lengths == {0}:
            raise ValueError(f"conversation row {index}: a conversation needs at least one turn")
    columns = {name: [row[name] for row in rows] for name in CONVERSATION_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=CONVERSATION_SCHEMA)


def pool_from_frame(frame: pd.DataFrame, where: str) -> pa.Table:
    """Pool rows of a pandas frame (extra columns ignored) back to a validated Arrow pool; ``where`` names it."""
    return check_pool(pa.Table.from_pandas(frame[list(POOL_COLUMNS)], preserve_index=False), where)
