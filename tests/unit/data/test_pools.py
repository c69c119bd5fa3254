"""Pool algebra: folding answers into conversations (Eq. 1), easy sampling, the two update policies."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

from mmdc.data.pools import fold_conversations, sample_easy, update_pools
from mmdc.data.schema import POOL_SCHEMA, generated_instruction_id, pool_table, seed_instruction_id


def seed_row(source_id: str, turn: int, image_id: str) -> dict:
    return {
        "instruction_id": seed_instruction_id(source_id, turn),
        "image_id": image_id,
        "image": f"/imgs/{image_id}.jpg",
        "question": f"seed {source_id} turn {turn}",
        "origin": "seed",
        "parent_id": None,
        "iteration": 0,
        "turn": turn,
        "image_position": "before" if turn == 0 else "none",
        "source_id": source_id,
    }


def gen_row(parent: dict, iteration: int, attempt: int = 0) -> dict:
    return {
        **parent,
        "instruction_id": generated_instruction_id(parent["instruction_id"], iteration, attempt),
        "question": f"generated from {parent['instruction_id']} at {iteration}.{attempt}",
        "origin": "generated",
        "parent_id": parent["instruction_id"],
        "iteration": iteration,
        "turn": -1,
        "image_position": "none",
    }


# --- fold_conversations ---------------------------------------------------------------------------------------


def test_fold_orders_seeds_by_source_then_generated_by_iteration_and_id():
    s_b1, s_b0, s_a0 = seed_row("srcB", 1, "img"), seed_row("srcB", 0, "img"), seed_row("srcA", 0, "img")
    g2 = gen_row(s_b0, 2)
    g1a, g1b = gen_row(s_b0, 1, 0), gen_row(s_a0, 1, 0)
    other = seed_row("srcC", 0, "img0")
    rows = [g2, s_b1, g1a, s_b0, other, g1b, s_a0]
    answered = pd.DataFrame(rows)
    answered["answer"] = [f"ans {r['instruction_id']}" for r in rows]
    out = fold_conversations(answered)
    assert list(out.columns) == ["conversation_id", "image_id", "image", "questions", "answers", "instruction_ids"]
    assert out["conversation_id"].tolist() == ["img", "img0"]  # ordered by image_id
    first = out.iloc[0]
    gen_1 = sorted([g1a["instruction_id"], g1b["instruction_id"]])
    expected = [s_a0["instruction_id"], s_b0["instruction_id"], s_b1["instruction_id"], *gen_1, g2["instruction_id"]]
    assert first["instruction_ids"] == expected
    assert first["answers"] == [f"ans {i}" for i in expected]
    by_id = {r["instruction_id"]: r["question"] for r in rows}
    assert first["questions"] == [by_id[i] for i in expected]
    assert first["image"] == "/imgs/img.jpg"
    assert out.attrs["skipped_empty_answers"] == 0


def test_fold_skips_and_counts_empty_answers():
    rows = [seed_row("s", t, "img") for t in range(4)] + [seed_row("t", 0, "lonely")]
    answered = pd.DataFrame(rows)
    answered["answer"] = ["a0", "", None, "   ", ""]
    out = fold_conversations(answered)
    assert out.attrs["skipped_empty_answers"] == 4
    assert out["conversation_id"].tolist() == ["img"]  # an image left with no answered turn has no conversation
    assert out.iloc[0]["answers"] == ["a0"]


def test_fold_rejects_two_files_for_one_image_and_missing_columns():
    a, b = seed_row("s", 0, "img"), seed_row("s", 1, "img")
    b["image"] = "/elsewhere/img.jpg"
    answered = pd.DataFrame([a, b]).assign(answer="x")
    with pytest.raises(ValueError, match="'img' points to several image files"):
        fold_conversations(answered)
    with pytest.raises(ValueError, match="answer"):
        fold_conversations(pd.DataFrame([a]))


def test_fold_reads_a_named_answer_column():
    rows = pd.DataFrame([seed_row("s", 0, "img")]).assign(teacher_answer="from the teacher")
    out = fold_conversations(rows, answer_column="teacher_answer")
    assert out.iloc[0]["answers"] == ["from the teacher"]


# --- sample_easy ----------------------------------------------------------------------------------------------


def _assessment(hard: dict[str, bool | None]) -> pd.DataFrame:
    return pd.DataFrame({"instruction_id": list(hard), "hard": pd.array(list(hard.values()), dtype="boolean")})


def test_sample_easy_only_easy_deterministic_and_order_free():
    hard = {f"id{i:02d}": (None if i % 7 == 0 else i % 3 == 0) for i in range(40)}
    df = _assessment(hard)
    easy = {k for k, v in hard.items() if v is False}
    picked = sample_easy(df, 5, seed=3)
    assert len(picked) == 5 and set(picked) <= easy and picked == sorted(picked)
    assert sample_easy(df.iloc[::-1], 5, seed=3) == picked  # row order does not matter
    assert sample_easy(df, 5, seed=4) != picked  # the seed does
    assert sorted(sample_easy(df, 10_000, seed=3)) == sorted(easy)  # fewer when not enough
    assert sample_easy(df, 0, seed=3) == []
    assert sample_easy(_assessment({"a": True, "b": None}), 3, seed=0) == []


# --- update_pools ---------------------------------------------------------------------------------------------


@pytest.fixture()
def world():
    """12 seeds over 4 images; ids 0-3 hard, 4-9 easy, 10-11 unscored; hard 0, 1, 2 produced accepted children."""
    seeds = [seed_row(f"src{i // 3}", i % 3, f"img{i // 3}") for i in range(12)]
    pool = pool_table(seeds)
    ids = [r["instruction_id"] for r in seeds]
    hard = {iid: (True if i < 4 else False if i < 10 else None) for i, iid in enumerate(ids)}
    accepted = pool_table([gen_row(seeds[i], 1) for i in (0, 1, 2)])
    return seeds, ids, pool, _assessment(hard), accepted


def _ids(table: pa.Table) -> list[str]:
    return table.column("instruction_id").to_pylist()


def test_refresh_policy(world):
    seeds, ids, pool, assessment, accepted = world
    tuning, cache, counts = update_pools("refresh", pool, pool, assessment, accepted, seed=7, iteration=1)
    new_ids = _ids(accepted)
    assert _ids(tuning)[:3] == new_ids
    easy_part = _ids(tuning)[3:]
    assert len(easy_part) == 3 and set(easy_part) <= set(ids[4:10])
    assert easy_part == sorted(easy_part, key=ids.index)  # in cache order
    assert _ids(cache) == ids + new_ids  # nothing lost, nothing duplicated
    assert tuning.schema == POOL_SCHEMA and cache.schema == POOL_SCHEMA
    assert counts["accepted"] == 3 and counts["easy_sampled"] == 3
    assert counts["hard"] == 4 and counts["easy"] == 6 and counts["unscored"] == 2
    assert counts["tuning_after"] == 6 and counts["cache_after"] == 15 and counts["cache_before"] == 12
    again = update_pools("refresh", pool, pool, assessment, accepted, seed=7, iteration=1)
    assert again[0].equals(tuning) and again[1].equals(cache)


def test_refresh_with_too_few_easy_rows(world):
    seeds, ids, pool, assessment, _ = world
    many = pool_table([gen_row(seeds[i], 1, attempt=a) for i in range(4) for a in range(2)])  # 8 > 6 easy
    tuning, _, counts = update_pools("refresh", pool, pool, assessment, many, seed=0, iteration=1)
    assert counts["easy_sampled"] == 6 and tuning.num_rows == 14
    assert len(set(_ids(tuning))) == 14


def test_replace_policy_swaps_parents_in_place(world):
    seeds, ids, pool, assessment, accepted = world
    orphan_parent = seed_row("elsewhere", 0, "img9")
    orphan = pool_table([gen_row(orphan_parent, 1)])
    both = pa.concat_tables([accepted, orphan])
    cache_in = pa.concat_tables([pool, pool_table([orphan_parent])])
    tuning, cache, counts = update_pools("replace", pool, cache_in, assessment, both, seed=7, iteration=1)
    got = _ids(tuning)
    new = _ids(accepted)
    # Parents 0, 1, 2 replaced in their positions, the other nine kept, the orphan appended; no easy row added
    # because every easy row is already in the tuning pool.
    assert got[:12] == new + ids[3:12]
    assert got[12] == _ids(orphan)[0]
    assert len(got) == 13 and len(set(got)) == 13
    assert not set(ids[:3]) & set(got)
    assert counts["parents_replaced"] == 3 and counts["appended_without_parent"] == 1 and counts["easy_sampled"] == 0
    assert _ids(cache) == _ids(cache_in) + _ids(both)


def test_replace_adds_easy_rows_not_already_in_tuning(world):
    seeds, ids, pool, assessment, accepted = world
    small_tuning = pool.slice(0, 6)  # ids 0-5: parents 0-2 plus easy 4, 5
    tuning, _, counts = update_pools("replace", small_tuning, pool, assessment, accepted, seed=1, iteration=1)
    got = _ids(tuning)
    assert got[:6] == _ids(accepted) + ids[3:6]
    assert len(got[6:]) == 3 and set(got[6:]) <= set(ids[6:10])  # easy, not yet in the pool
    assert len(set(got)) == len(got)
    assert counts["easy_sampled"] == 3


def test_two_children_of_one_parent_both_replace_it(world):
    seeds, ids, pool, assessment, _ = world
    kids = pool_table([gen_row(seeds[0], 1, 0), gen_row(seeds[0], 1, 1)])
    tuning, _, counts = update_pools("replace", pool, pool, assessment, kids, seed=0, iteration=1)
    assert _ids(tuning)[:3] == _ids(kids) + [ids[1]]
    assert counts["parents_replaced"] == 1


def test_policies_differ_by_seed_and_iteration_only_in_easy_sample(world):
    _, _, pool, assessment, accepted = world
    draws = {tuple(_ids(update_pools("refresh", pool, pool, assessment, accepted, s, 1)[0])) for s in range(8)}
    assert len(draws) > 1
    assert all(d[:3] == tuple(_ids(accepted)) for d in draws)


def test_update_pools_rejects_bad_input(world):
    seeds, ids, pool, assessment, accepted = world
    with pytest.raises(ValueError, match="policy"):
        update_pools("merge", pool, pool, assessment, accepted, 0, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="iteration 1 != 2"):
        update_pools("refresh", pool, pool, assessment, accepted, 0, 2)
    with pytest.raises(ValueError, match="already in the cache pool"):
        update_pools("refresh", pool, pa.concat_tables([pool, accepted]), assessment, accepted, 0, 1)
    with pytest.raises(ValueError, match="appears twice in the accepted_generated"):
        update_pools("refresh", pool, pool, assessment, pa.concat_tables([accepted, accepted]), 0, 1)
    with pytest.raises(ValueError, match="expected origin 'generated'"):
        update_pools(
            "refresh",
            pool,
            pool,
            assessment,
            pool_table([seed_row("new", 0, "x")]).set_column(6, "iteration", pa.array([1], pa.int32())),
            0,
            1,
        )
    with pytest.raises(ValueError, match="missing column"):
        update_pools("refresh", pool.drop_columns(["turn"]), pool, assessment, accepted, 0, 1)


def test_update_pools_accepts_a_dataframe_of_new_rows(world):
    _, _, pool, assessment, accepted = world
    from_df = update_pools("refresh", pool, pool, assessment, accepted.to_pandas(), 5, 1)
    from_table = update_pools("refresh", pool, pool, assessment, accepted, 5, 1)
    assert from_df[0].equals(from_table[0])


def test_advance_pools_takes_only_accepted_candidates_from_frames(world):
    from mmdc.data.pools import advance_pools

    _, _, pool, assessment, accepted = world
    candidates = accepted.to_pandas().assign(accepted=True, augmentor_reply="r", rouge_l_max=0.1, reject_reason=None)
    rejected = candidates.iloc[:1].assign(instruction_id="rejected0", accepted=False, reject_reason="duplicate")
    checked = pd.concat([candidates, rejected], ignore_index=True)
    frame = pool.to_pandas()
    got = advance_pools("refresh", frame, frame, assessment, checked, seed=7, iteration=1)
    want = update_pools("refresh", pool, pool, assessment, accepted, seed=7, iteration=1)
    assert got[0].equals(want[0]) and got[1].equals(want[1]) and got[2] == want[2]
