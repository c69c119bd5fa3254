"""Pool / conversation schemas: the contract every module writes through."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmdc.data.schema import (
    CONVERSATION_SCHEMA,
    POOL_SCHEMA,
    check_pool,
    conversation_table,
    empty_pool,
    generated_instruction_id,
    pool_table,
    seed_instruction_id,
)


def seed_row(**overrides) -> dict:
    row = {
        "instruction_id": seed_instruction_id("000000033471", 0),
        "image_id": "000000033471",
        "image": "000000033471.jpg",
        "question": "What are the colors of the bus?",
        "origin": "seed",
        "parent_id": None,
        "iteration": 0,
        "turn": 0,
        "image_position": "before",
        "source_id": "000000033471",
    }
    row.update(overrides)
    return row


def generated_row(**overrides) -> dict:
    parent = seed_instruction_id("000000033471", 0)
    row = seed_row(
        instruction_id=generated_instruction_id(parent, 1, 0),
        question="Is the bus parked?",
        origin="generated",
        parent_id=parent,
        iteration=1,
        turn=-1,
        image_position="none",
    )
    row.update(overrides)
    return row


def test_column_order_is_the_contract():
    assert POOL_SCHEMA.names == [
        "instruction_id",
        "image_id",
        "image",
        "question",
        "origin",
        "parent_id",
        "iteration",
        "turn",
        "image_position",
        "source_id",
    ]
    assert POOL_SCHEMA.field("iteration").type == pa.int32()
    assert POOL_SCHEMA.field("parent_id").nullable
    assert CONVERSATION_SCHEMA.names == [
        "conversation_id",
        "image_id",
        "image",
        "questions",
        "answers",
        "instruction_ids",
    ]


def test_ids_are_sha1_prefixes_checked_by_hand():
    # printf '000000033471:0' | sha1sum -> 2ec57ee5a0e430d4b196...
    assert seed_instruction_id("000000033471", 0) == "2ec57ee5a0e430d4"
    # printf 'abc:gen:2:1' | sha1sum -> 42760bc28def6b85...
    assert generated_instruction_id("abc", 2, 1) == "42760bc28def6b85"
    assert generated_instruction_id("abc", 2, 1) != generated_instruction_id("abc", 2, 2)


def test_pool_table_builds_typed_table():
    table = pool_table([seed_row(), generated_row()])
    assert table.schema == POOL_SCHEMA
    assert table.column("parent_id").to_pylist()[0] is None
    assert table.column("turn").to_pylist() == [0, -1]


def test_empty_pool_has_schema_and_concatenates():
    empty = empty_pool()
    assert empty.num_rows == 0 and empty.schema == POOL_SCHEMA
    assert pa.concat_tables([empty, pool_table([seed_row()])]).num_rows == 1
    assert pool_table([]).schema == POOL_SCHEMA


@pytest.mark.parametrize(
    "index_of_bad, bad, message",
    [
        (1, {"question": 3}, "pool row 1, column 'question': expected str"),
        (1, {"iteration": "0"}, "pool row 1, column 'iteration': expected int"),
        (1, {"iteration": True}, "pool row 1, column 'iteration': expected int"),
        (1, {"turn": 2**40}, "pool row 1, column 'turn': 1099511627776 does not fit int32"),
        (1, {"origin": "synthetic"}, "pool row 1, column 'origin'"),
        (1, {"image_position": "middle"}, "pool row 1, column 'image_position'"),
        (1, {"question": "   "}, "pool row 1, column 'question': must not be empty"),
        (1, {"instruction_id": ""}, "pool row 1, column 'instruction_id': must not be empty"),
        (1, {"parent_id": "abc"}, "pool row 1, column 'parent_id': a seed row has no parent"),
        (1, {"iteration": 2}, "pool row 1, column 'iteration': a seed row has iteration 0"),
        (1, {"extra": 1}, "pool row 1: unknown column(s) ['extra']"),
    ],
)
def test_pool_table_names_row_and_column(index_of_bad, bad, message):
    rows = [seed_row(), seed_row(**bad)]
    with pytest.raises(ValueError) as err:
        pool_table(rows)
    assert message in str(err.value)


def test_missing_column_and_generated_lineage_errors():
    row = seed_row()
    del row["source_id"]
    with pytest.raises(ValueError, match=r"pool row 0: missing column\(s\) \['source_id'\]"):
        pool_table([row])
    with pytest.raises(ValueError, match="pool row 0, column 'parent_id': a generated row needs"):
        pool_table([generated_row(parent_id=None)])
    with pytest.raises(ValueError, match="pool row 0, column 'turn': a generated row has turn -1"):
        pool_table([generated_row(turn=0)])
    with pytest.raises(ValueError, match="pool row 2: expected a dict"):
        pool_table([seed_row(), seed_row(), ["not", "a", "row"]])


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    table = pool_table([seed_row(turn=np.int64(3))])
    assert table.column("turn").to_pylist() == [3]


def test_check_pool_round_trips_parquet_and_rejects_bad_files(tmp_path):
    path = tmp_path / "pool.parquet"
    original = pool_table([seed_row(), generated_row()])
    # Reordered columns and int64 on disk still come back as the contract.
    on_disk = original.select(list(reversed(POOL_SCHEMA.names))).cast(
        pa.schema([pa.field(f.name, pa.int64() if f.type == pa.int32() else f.type) for f in reversed(POOL_SCHEMA)])
    )
    pq.write_table(on_disk, path)
    assert check_pool(pq.read_table(path), where=str(path)).equals(original)

    with pytest.raises(ValueError, match=r"pool.parquet: missing pool column\(s\) \['turn'\]"):
        check_pool(original.drop_columns(["turn"]), where=str(path))
    tampered = original.set_column(5, "parent_id", pa.array(["x", "y"], pa.string()))
    with pytest.raises(ValueError, match="pool row 0, column 'parent_id': a seed row has no parent"):
        check_pool(tampered, where=str(path))


def test_conversation_table_validates_parallel_lists():
    good = {
        "conversation_id": "img_1",
        "image_id": "img_1",
        "image": "img_1.png",
        "questions": ["Q1", "Q2"],
        "answers": ["A1", "A2"],
        "instruction_ids": ["a", "b"],
    }
    table = conversation_table([good])
    assert table.schema == CONVERSATION_SCHEMA
    assert table.column("answers").to_pylist() == [["A1", "A2"]]
    with pytest.raises(ValueError, match="conversation row 1: questions, answers and instruction_ids differ"):
        conversation_table([good, {**good, "answers": ["A1"]}])
    with pytest.raises(ValueError, match="conversation row 0: a conversation needs at least one turn"):
        conversation_table([{**good, "questions": [], "answers": [], "instruction_ids": []}])
    with pytest.raises(ValueError, match="conversation row 0, column 'questions': expected a list of str"):
        conversation_table([{**good, "questions": ["Q1", 2]}])
