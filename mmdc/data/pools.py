"""Pool algebra of paper section 3.3: fold answers into conversations, sample easy rows, update the two pools.

The tuning pool is what the teacher answers and the student trains on; the
cache pool is what gets assessed. Every iteration writes new versions of both
(never edits in place), so these functions take tables and return new ones.
They are pure and deterministic under a seed: a resumed run must rebuild the
same pools as an uninterrupted one, and a user must be able to account for
every row (the ``counts`` dict says what moved where).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

Policy = Literal["refresh", "replace"]
POLICIES: tuple[str, ...] = ("refresh", "replace")
CONVERSATION_COLUMNS = ("conversation_id", "image_id", "image", "questions", "answers", "instruction_ids")
SKIPPED_ATTR = "skipped_empty_answers"  # DataFrame.attrs key set by fold_conversations


def _require(frame_columns: Sequence[str], needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in frame_columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}")


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def fold_conversations(answered: pd.DataFrame, answer_column: str = "answer") -> pd.DataFrame:
    """Eq. 1: group answered single-turn rows by image into one multi-turn conversation per image.

    ``answered`` holds pool columns plus the answer (column ``answer_column``,
    e.g. "teacher_answer" straight from the teach phase). Within an image, seed rows
    come first in their source order (source_id, turn), then generated rows by
    (iteration, instruction_id). Rows whose answer is missing or blank are
    skipped; how many is in ``result.attrs["skipped_empty_answers"]``.
    Conversations are ordered by image_id. Columns: CONVERSATION_COLUMNS
    (conversation_id = image_id; questions / answers / instruction_ids are
    parallel lists, turn t at index t).
    """
    _require(
        answered.columns,
        ("instruction_id", "image_id", "image", "question", "origin", "iteration", "turn", "source_id", answer_column),
        "fold_conversations",
    )
    blank = answered[answer_column].map(_is_blank).to_numpy(dtype=bool)
    rows = answered.loc[~blank]
    bad_origin = ~rows["origin"].isin(("seed", "generated"))
    if bad_origin.any():
        row = rows[bad_origin].iloc[0]
        raise ValueError(f"fold_conversations: instruction {row['instruction_id']!r} has origin {row['origin']!r}")

    seed = (rows["origin"] == "seed").to_numpy()
    keys = pd.DataFrame(
        {
            "image_id": rows["image_id"].astype(str).to_numpy(),
            "rank": np.where(seed, 0, 1),  # seeds first
            "k_source": np.where(seed, rows["source_id"].astype(str).to_numpy(), ""),
            "k_number": np.where(seed, rows["turn"].to_numpy(), rows["iteration"].to_numpy()).astype(np.int64),
            "k_id": np.where(seed, "", rows["instruction_id"].astype(str).to_numpy()),
            "position": np.arange(len(rows)),
        }
    )
    keys = keys.sort_values(["image_id", "rank", "k_source", "k_number", "k_id"], kind="stable")
    ordered = rows.iloc[keys["position"].to_numpy()]

    # Rows are now grouped by image (sorted); cut the columns at the group boundaries instead of a groupby-agg.
    image_ids = keys["image_id"].to_numpy()  # [rows], sorted
    starts = np.flatnonzero(np.r_[True, image_ids[1:] != image_ids[:-1]]) if len(image_ids) else np.array([], int)
    bounds = list(zip(starts.tolist(), np.r_[starts[1:], len(image_ids)].tolist()))
    images = ordered["image"].astype(str).tolist()
    for start, end in bounds:
        if len(set(images[start:end])) > 1:
            raise ValueError(
                f"fold_conversations: image_id {image_ids[start]!r} points to several image files "
                f"{sorted(set(images[start:end]))}"
            )
    questions, answers, ids = (ordered[c].tolist() for c in ("question", answer_column, "instruction_id"))
    group_ids = [image_ids[start] for start, _ in bounds]
    result = pd.DataFrame(
        {
            "conversation_id": pd.Series(group_ids, dtype=object),
            "image_id": pd.Series(group_ids, dtype=object),
            "image": pd.Series([images[start] for start, _ in bounds], dtype=object),
            "questions": pd.Series([questions[a:b] for a, b in bounds], dtype=object),
            "answers": pd.Series([answers[a:b] for a, b in bounds], dtype=object),
            "instruction_ids": pd.Series([ids[a:b] for a, b in bounds], dtype=object),
        }
    )
    result.attrs[SKIPPED_ATTR] = int(blank.sum())
    return result


def sample_easy(assessment_df: pd.DataFrame, n: int, seed: int | Sequence[int]) -> list[str]:
    """Ids of ``n`` easy instructions (``hard`` is False; unscored rows never count) drawn without replacement.

    Fewer than ``n`` when there are not enough. Deterministic in (set of easy
    ids, n, seed), whatever the row order; the ids come back sorted.
    """
    _require(assessment_df.columns, ("instruction_id", "hard"), "sample_easy")
    if n < 0:
        raise ValueError(f"sample_easy: n must be >= 0, got {n}")
    easy_mask = assessment_df["hard"].astype("boolean").eq(False).fillna(False).to_numpy(dtype=bool)
    easy = np.sort(assessment_df.loc[easy_mask, "instruction_id"].astype(str).unique())  # [easy]
    take = min(n, len(easy))
    if take == 0:
        return []
    picked = np.random.default_rng(seed).choice(len(easy), size=take, replace=False)
    return sorted(easy[picked].tolist())


def _as_pool(table: pa.Table | pd.DataFrame, schema: pa.Schema, what: str) -> pa.Table:
    """``table`` with the pool's columns, in the pool's order and types."""
    if isinstance(table, pd.DataFrame):
        _require(table.columns, schema.names, what)
        return pa.Table.from_pandas(table[schema.names], schema=schema, preserve_index=False)
    _require(table.column_names, schema.names, what)
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ValueError(f"{what}: does not cast to the pool schema: {err}") from err


def _ids(table: pa.Table) -> list[str]:
    return table.column("instruction_id").to_pylist()


def _first_duplicate(ids: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for item in ids:
        if item in seen:
            return item
        seen.add(item)
    return None


def update_pools(
    policy: Policy,
    tuning: pa.Table,
    cache: pa.Table,
    assessment: pd.DataFrame,
    accepted_generated: pa.Table | pd.DataFrame,
    seed: int,
    iteration: int,
) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """The next iteration's (tuning pool, cache pool, counts) after one round of assessment and augmentation.

    ``accepted_generated``: the valid new questions of this round (pool rows,
    origin "generated", this ``iteration``, parent_id set). ``assessment``:
    this round's assessment of the cache pool (instruction_id, hard). The easy
    sample has as many rows as there are accepted questions (fewer if there
    are not enough easy ones), drawn with ``sample_easy`` under (seed,
    iteration) and taken from the cache pool.

    refresh: next tuning = accepted questions, then the easy sample.
    replace: next tuning = the current tuning pool where each parent is
      replaced, in place, by its accepted children; children whose parent is
      not in it are appended; then the easy sample, drawn only from easy rows
      not already in it.
    Both: next cache = cache + accepted questions.

    Raises ValueError if an id is duplicated in an input, an accepted id is
    already in the cache, or an accepted row is not a generated row of this
    iteration.
    """
    from mmdc.data.schema import POOL_SCHEMA  # owned by the schema module; imported late to keep this one light

    if policy not in POLICIES:
        raise ValueError(f"update_pools: policy must be one of {POLICIES}, got {policy!r}")
    tuning = _as_pool(tuning, POOL_SCHEMA, "update_pools: tuning pool")
    cache = _as_pool(cache, POOL_SCHEMA, "update_pools: cache pool")
    accepted = _as_pool(accepted_generated, POOL_SCHEMA, "update_pools: accepted_generated")
    _require(assessment.columns, ("instruction_id", "hard"), "update_pools: assessment")

    tuning_ids, cache_ids, accepted_ids = _ids(tuning), _ids(cache), _ids(accepted)
    for what, ids in (("tuning pool", tuning_ids), ("cache pool", cache_ids), ("accepted_generated", accepted_ids)):
        duplicate = _first_duplicate(ids)
        if duplicate is not None:
            raise ValueError(f"update_pools: instruction_id {duplicate!r} appears twice in the {what}")
    cache_set = set(cache_ids)
    for index, row in enumerate(accepted.select(["instruction_id", "origin", "parent_id", "iteration"]).to_pylist()):
        where = f"update_pools: accepted_generated row {index} ({row['instruction_id']!r})"
        if row["instruction_id"] in cache_set:
            raise ValueError(f"{where} is already in the cache pool")
        if row["origin"] != "generated" or not row["parent_id"]:
            raise ValueError(f"{where}: expected origin 'generated' with a parent_id")
        if row["iteration"] != iteration:
            raise ValueError(f"{where}: iteration {row['iteration']} != {iteration}")

    hard = assessment["hard"].astype("boolean")
    counts: dict[str, Any] = {
        "policy": policy,
        "iteration": iteration,
        "tuning_before": tuning.num_rows,
        "cache_before": cache.num_rows,
        "assessed": len(assessment),
        "hard": int(hard.eq(True).sum()),
        "easy": int(hard.eq(False).sum()),
        "unscored": int(hard.isna().sum()),
        "accepted": accepted.num_rows,
    }
    n_new = accepted.num_rows

    if policy == "refresh":
        easy_ids = sample_easy(assessment, n_new, (seed, iteration))
        body = accepted
        counts.update(parents_replaced=0, appended_without_parent=0)
    else:
        body, replaced, appended = _replace_parents(tuning, accepted)
        assessed_ids = pa.array(assessment["instruction_id"].astype(str).tolist(), pa.string())
        in_body = pc.is_in(assessed_ids, value_set=body.column("instruction_id").combine_chunks())
        candidates = assessment[~np.asarray(in_body.to_numpy(zero_copy_only=False), dtype=bool)]
        easy_ids = sample_easy(candidates, n_new, (seed, iteration))
        counts.update(parents_replaced=replaced, appended_without_parent=appended)

    missing = set(easy_ids) - cache_set
    if missing:
        raise ValueError(f"update_pools: easy instruction {sorted(missing)[0]!r} is assessed but not in the cache pool")
    easy_rows = cache.filter(pc.is_in(cache.column("instruction_id"), value_set=pa.array(easy_ids, pa.string())))
    next_tuning = pa.concat_tables([body, easy_rows])
    next_cache = pa.concat_tables([cache, accepted])
    counts.update(
        easy_sampled=easy_rows.num_rows,
        tuning_after=next_tuning.num_rows,
        cache_after=next_cache.num_rows,
    )
    return next_tuning, next_cache, counts


def _replace_parents(tuning: pa.Table, accepted: pa.Table) -> tuple[pa.Table, int, int]:
    """Tuning pool with each parent row swapped for its accepted children (in accepted order), orphans appended.

    Returns (table, parents replaced, children appended without a parent in the pool).
    """
    tuning_ids = _ids(tuning)
    position = {iid: i for i, iid in enumerate(tuning_ids)}
    children: dict[int, list[int]] = {}
    orphans: list[int] = []
    for j, parent in enumerate(accepted.column("parent_id").to_pylist()):
        if parent in position:
            children.setdefault(position[parent], []).append(j)
        else:
            orphans.append(j)
    # Row picks over tuning ++ accepted: index < len(tuning) is a tuning row, else an accepted row.
    offset = tuning.num_rows
    picks: list[int] = []
    for i in range(tuning.num_rows):
        if i in children:
            picks.extend(offset + j for j in children[i])
        else:
            picks.append(i)
    picks.extend(offset + j for j in orphans)
    both = pa.concat_tables([tuning, accepted])
    return both.take(pa.array(picks, pa.int64())), len(children), len(orphans)


def advance_pools(
    policy: Policy,
    tuning: pd.DataFrame,
    cache: pd.DataFrame,
    assessment: pd.DataFrame,
    checked: pd.DataFrame,
    seed: int,
    iteration: int,
) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """``update_pools`` from pandas frames as a phase holds them: ``checked`` is every candidate of the round with
    its ``accepted`` flag (``augment.accept_candidates``); the pools come back validated against the schema."""
    from mmdc.data.schema import POOL_COLUMNS, pool_from_frame

    accepted = checked[checked["accepted"]][list(POOL_COLUMNS)]
    return update_pools(
        policy,
        pool_from_frame(tuning, "tuning pool"),
        pool_from_frame(cache, "cache pool"),
        assessment,
        pool_from_frame(accepted, "accepted questions"),
        seed=seed,
        iteration=iteration,
    )
