"""Run-output digests: equal for the same rows whatever the file layout, different for any changed value."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from mmdc.rundir import output_digests, table_digest


def test_digest_ignores_row_order_and_row_groups_but_not_values(tmp_path):
    t = pa.table({"instruction_id": ["b", "a", "c"], "question": ["q2", "q1", "q3"]})
    pq.write_table(t, tmp_path / "one.parquet")
    pq.write_table(t.sort_by("instruction_id"), tmp_path / "two.parquet", row_group_size=1)
    assert table_digest(tmp_path / "one.parquet") == table_digest(tmp_path / "two.parquet")
    changed = t.set_column(1, "question", pa.array(["q2", "q1", "Q3"]))
    pq.write_table(changed, tmp_path / "three.parquet")
    assert table_digest(tmp_path / "three.parquet") != table_digest(tmp_path / "one.parquet")


def test_output_digests_cover_pools_assessments_and_generated(tmp_path):
    t = pa.table({"instruction_id": ["a"]})
    for rel in [
        "pools/iter_0/tuning.parquet",
        "assessments/iter_1.parquet",
        "generated/iter_1.parquet",
        "checkpoints/x.parquet",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, tmp_path / rel)
    assert sorted(output_digests(tmp_path)) == [
        "assessments/iter_1.parquet",
        "generated/iter_1.parquet",
        "pools/iter_0/tuning.parquet",
    ]
