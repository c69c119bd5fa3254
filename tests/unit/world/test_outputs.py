"""mmdc/world/outputs.py: a run's assessments and tuning data graded against the world's truth."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from world_rows import ROWS, SCENES

from mmdc.world import outputs


def world_run(root: Path, rows=ROWS, iteration: int = 1) -> Path:
    """A run directory with the world's scenes and one assessment (``rows`` as above)."""
    (root / "data" / "world").mkdir(parents=True, exist_ok=True)
    (root / outputs.SCENES_FILE).write_text("\n".join(json.dumps(s.to_dict()) for s in SCENES) + "\n")
    (root / "assessments").mkdir(exist_ok=True)
    frame = pd.DataFrame(
        {
            "instruction_id": [f"i{n}" for n in range(len(rows))],
            "image_id": [r[0] for r in rows],
            "question": [r[1] for r in rows],
            "teacher_answer": [r[2] for r in rows],
            "student_answer": [r[3] for r in rows],
            "score_student": [5.0] * len(rows),
            "difficulty": [r[4] for r in rows],
            "hard": pd.array([r[5] for r in rows], dtype="boolean"),
        }
    )
    frame.to_parquet(root / "assessments" / f"iter_{iteration}.parquet")
    return root


def test_graded_assessment_keeps_scored_readable_rows_with_both_verdicts(tmp_path):
    root = world_run(tmp_path)
    scenes = outputs.run_scenes(root)
    assert set(scenes) == {"img0", "img1"}
    assert outputs.assessment_files(root) == {1: root / "assessments" / "iter_1.parquet"}
    graded = outputs.graded_assessment(pd.read_parquet(root / "assessments" / "iter_1.parquet"), scenes)
    assert list(graded.columns) == list(outputs.GRADED_COLUMNS)
    assert graded["instruction_id"].tolist() == ["i0", "i1", "i2", "i3"]
    assert graded["family"].tolist() == ["exist", "color", "color", "exist"]
    assert graded["student_right"].tolist() == [True, False, False, True]
    assert graded["teacher_right"].tolist() == [True, True, False, False]
    assert graded["hard"].tolist() == [False, True, True, True]


def test_grade_assessment_counts_and_a_run_without_a_world(tmp_path):
    root = world_run(tmp_path)
    counts = outputs.grade_assessment(
        pd.read_parquet(root / "assessments" / "iter_1.parquet"), outputs.run_scenes(root)
    )
    assert counts["scored"] == 4 and counts["hard"] == 3 and counts["easy"] == 1
    assert counts["hard_student_right"] == 1 and counts["hard_teacher_right"] == 1 and counts["easy_teacher_right"] == 1
    assert outputs.run_scenes(tmp_path / "elsewhere") is None


def test_grade_conversations_counts_the_teacher_answers_a_phase_trained_on():
    conversations = pd.DataFrame(
        {
            "image_id": ["img0", "img1"],
            "questions": [["Is there a red circle in the image?", "Tell me a story."], ["What color is the square?"]],
            "answers": [["Yes.", "Once..."], ["Blue."]],
        }
    )
    counts = outputs.grade_conversations(conversations, {s.image_id: s for s in SCENES})
    assert counts == {"rows": 3, "readable": 2, "exist": 1, "color": 1, "right": 2}
