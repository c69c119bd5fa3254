"""Row-level resume of an interrupted inference phase: which rows a crashed attempt already wrote."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from mmdc.data.blocks import resume_partial


def _table(ids: list[str]) -> pa.Table:
    return pa.table({"instruction_id": ids, "question": [f"q{i}" for i in ids]})


def test_no_tmp_folder_means_everything_to_do(tmp_path):
    done, todo = resume_partial(tmp_path / "missing.tmp", _table(["a", "b"]), "instruction_id")
    assert done == 0 and todo.column("instruction_id").to_pylist() == ["a", "b"]


def test_complete_files_are_kept_and_their_rows_skipped(tmp_path):
    tmp = tmp_path / "out.tmp"
    tmp.mkdir()
    pq.write_table(_table(["b", "c"]), tmp / "block_0.parquet")
    done, todo = resume_partial(tmp, _table(["a", "b", "c", "d"]), "instruction_id")
    assert done == 2
    assert todo.column("instruction_id").to_pylist() == ["a", "d"]
    assert (tmp / "block_0.parquet").exists()


def test_cut_off_file_is_deleted_and_its_rows_redone(tmp_path):
    tmp = tmp_path / "out.tmp"
    tmp.mkdir()
    pq.write_table(_table(["a"]), tmp / "good.parquet")
    (tmp / "cut.parquet").write_bytes(b"PAR1\x00\x01garbage")
    (tmp / "_ray_write_marker").write_text("x")
    done, todo = resume_partial(tmp, _table(["a", "b"]), "instruction_id")
    assert done == 1 and todo.column("instruction_id").to_pylist() == ["b"]
    assert sorted(p.name for p in tmp.iterdir()) == ["good.parquet"]


def test_rows_not_in_this_input_or_duplicated_are_dropped_with_their_file(tmp_path):
    tmp = tmp_path / "out.tmp"
    tmp.mkdir()
    pq.write_table(_table(["a", "zzz"]), tmp / "0_stale.parquet")  # zzz is not asked for any more
    pq.write_table(_table(["b"]), tmp / "1_ok.parquet")
    pq.write_table(_table(["b"]), tmp / "2_dup.parquet")  # the same rows twice: keep one copy
    done, todo = resume_partial(tmp, _table(["a", "b"]), "instruction_id")
    assert done == 1 and todo.column("instruction_id").to_pylist() == ["a"]
    assert sorted(p.name for p in tmp.iterdir()) == ["1_ok.parquet"]


def test_find_problems_checks_each_distinct_value_once_and_returns_only_problems():
    from mmdc.data.blocks import find_problems

    seen: list[str] = []

    def check(value: str) -> str | None:
        seen.append(value)
        return f"bad {value}" if value.startswith("x") else None

    assert find_problems(["a", "x1", "a", "x2", "x1"], check, parallel=False) == {"x1": "bad x1", "x2": "bad x2"}
    assert seen == ["a", "x1", "x2"]
    assert find_problems([], check, parallel=True) == {}  # nothing to check: no Ray Data job
