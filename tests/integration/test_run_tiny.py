"""The whole MmDC loop on the embedded default, one iteration, small pools, on the session's local Ray cluster.

Asserts on the run directory contract (ARCHITECTURE.md): pools per iteration, assessments with a
difficulty or an explicit unscored reason for every row, generated questions with lineage, a
student checkpoint in HF format that loads and generates, and metrics per phase. The run itself is the
session fixture ``tiny_run`` (tests/integration/conftest.py), shared with test_metrics_endpoint.py.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytestmark = pytest.mark.integration


def test_run_directory_layout(tiny_run):
    for rel in [
        "config.yaml",
        "state.json",
        "metrics.jsonl",
        "report.md",
        "pools/iter_0/tuning.parquet",
        "pools/iter_0/cache.parquet",
        "pools/iter_1/tuning.parquet",
        "pools/iter_1/cache.parquet",
        "assessments/iter_1.parquet",
        "generated/iter_1.parquet",
        "train/iter_1/conversations.parquet",
        "checkpoints/align/config.json",
        "checkpoints/student/iter_1/config.json",
        "eval/world/iter_0.json",
        "eval/world/iter_1.json",
        "eval/world/teacher.json",
        "plots/eval_per_iteration.png",
    ]:
        assert (tiny_run / rel).exists(), rel
    state = json.loads((tiny_run / "state.json").read_text())
    assert state["status"] == "finished"
    phases = [(c["iteration"], c["phase"]) for c in state["completed"]]
    assert phases == [
        (0, "prepare"),
        (0, "align"),
        (0, "eval"),
        (0, "eval_teacher"),
        (1, "teach"),
        (1, "tune"),
        (1, "eval"),
        (1, "assess"),
        (1, "augment"),
    ]


def test_every_cache_row_is_scored_or_says_why(tiny_run):
    cache0 = pd.read_parquet(tiny_run / "pools/iter_0/cache.parquet")
    a = pd.read_parquet(tiny_run / "assessments/iter_1.parquet")
    assert sorted(a["instruction_id"]) == sorted(cache0["instruction_id"])
    for col in [
        "instruction_id",
        "image_id",
        "question",
        "teacher_answer",
        "student_answer",
        "referee_replies",
        "scores_student",
        "scores_teacher",
        "score_student",
        "score_teacher",
        "difficulty",
        "hard",
        "unscored_reason",
    ]:
        assert col in a.columns, col
    scored = a["difficulty"].notna()
    assert (scored | a["unscored_reason"].notna()).all()
    assert (a.loc[~scored, "unscored_reason"].str.len() > 0).all()
    assert all(len(r) >= 2 for r in a["referee_replies"])  # both orders asked


def test_pools_grow_by_accepted_questions_with_lineage(tiny_run):
    cache0 = pd.read_parquet(tiny_run / "pools/iter_0/cache.parquet")
    cache1 = pd.read_parquet(tiny_run / "pools/iter_1/cache.parquet")
    gen = pd.read_parquet(tiny_run / "generated/iter_1.parquet")
    accepted = gen[gen["accepted"]]
    assert len(cache1) == len(cache0) + len(accepted)
    new = cache1[cache1["origin"] == "generated"]
    assert set(new["instruction_id"]) == set(accepted["instruction_id"])
    assert set(new["parent_id"]) <= set(cache0["instruction_id"])
    assert (gen.loc[~gen["accepted"], "reject_reason"].str.len() > 0).all()


def test_metrics_per_phase(tiny_run):
    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    phases = {m["phase"]: m for m in lines if "phase" in m}
    assert {"prepare", "align", "teach", "tune", "assess", "augment"} <= set(phases)
    assert phases["teach"]["cache_misses"] == phases["prepare"]["rows"]
    # The cache pool equals the tuning pool in iteration 1: the frozen teacher is never asked twice.
    assert phases["assess"]["cache_hits"] == phases["prepare"]["rows"]
    assert phases["assess"]["cache_misses"] == 0
    assert (
        phases["assess"]["hard"] + phases["assess"]["easy"] + phases["assess"]["unscored"] == phases["prepare"]["rows"]
    )


def test_student_checkpoint_loads_and_generates(tiny_run):
    from mmdc import roles
    from mmdc.engines.hf import HFGenerator
    from mmdc.engines.processors import image_url

    pool = pd.read_parquet(tiny_run / "pools/iter_0/cache.parquet")
    row = pool.iloc[0]
    gen = HFGenerator(str(tiny_run / "checkpoints/student/iter_1"))
    root = str(tiny_run / "data/world/images")
    out = gen.generate(
        [
            {
                "messages": roles.student_messages(row["question"], image_url(row["image"], root)),
                "temperature": 0.0,
                "max_new_tokens": 8,
                "seed": 1,
            }
        ]
    )
    assert out[0]["completion_tokens"] >= 1
