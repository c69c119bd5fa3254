"""A run's outputs graded against the world's truth: what each tuning phase taught, and what each assessment found.

A run on the embedded world (``data.source: world``) keeps its scenes in ``data/world/scenes.jsonl``, so every
question it asked can be checked exactly (``mmdc.world.scenes``): the teacher's answers it trained on
(``train/iter_<k>/conversations.parquet``) and the student's and the teacher's answers on the cache pool at each
assessment (``assessments/iter_<k>.parquet``), beside the referee's difficulty and hard / easy verdict. Used by
the ablation summary (``mmdc.ablate``: the student's accuracy on the cache pool, the referee's ranking quality,
the teacher's accuracy on hard vs easy instructions) and by ``benchmarks/distillation_data.py``.

    scenes = run_scenes(run_dir)                                   # None: not a world run
    graded = graded_assessment(pd.read_parquet(run_dir / "assessments" / "iter_1.parquet"), scenes)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from mmdc.world.scenes import QuestionSpec, Scene, check_answer, load_scenes, parse_question

SCENES_FILE = Path("data") / "world" / "scenes.jsonl"  # relative to a run directory
GRADED_COLUMNS = ("instruction_id", "family", "difficulty", "hard", "student_right", "teacher_right")


def run_scenes(run_dir: str | Path) -> dict[str, Scene] | None:
    """The world scenes a run generated, by image id; None for a run that is not on the world."""
    path = Path(run_dir) / SCENES_FILE
    return load_scenes(path) if path.is_file() else None


def assessment_files(run_dir: str | Path) -> dict[int, Path]:
    """{iteration: ``assessments/iter_<k>.parquet``} of a run."""
    files = Path(run_dir).glob("assessments/iter_*.parquet")
    return {int(p.stem.removeprefix("iter_")): p for p in sorted(files) if p.stem.removeprefix("iter_").isdigit()}


def grade_conversations(conversations: pd.DataFrame, scenes: dict[str, Scene]) -> dict[str, int]:
    """Counts for one tuning phase: rows, readable questions, teacher right, and rows per question family."""
    counts: Counter = Counter()
    for image_id, questions, answers in zip(
        conversations["image_id"], conversations["questions"], conversations["answers"]
    ):
        scene = scenes[image_id]
        for question, reply in zip(questions, answers):
            counts["rows"] += 1
            spec = parse_question(question)
            if spec is None:
                continue
            counts["readable"] += 1
            counts[spec.family] += 1
            counts["right"] += bool(check_answer(scene, spec, reply))
    return dict(counts)


def scored_rows(assessment: pd.DataFrame, scenes: dict[str, Scene]) -> Iterator[tuple[Any, Scene, QuestionSpec, bool]]:
    """(row, scene, spec, student right) for each assessment row that was scored and that the world can read."""
    for row in assessment.itertuples(index=False):
        spec = parse_question(row.question)
        if spec is None or pd.isna(row.difficulty):
            continue
        scene = scenes[row.image_id]
        yield row, scene, spec, bool(check_answer(scene, spec, row.student_answer))


def graded_assessment(assessment: pd.DataFrame, scenes: dict[str, Scene]) -> pd.DataFrame:
    """One row per scored, readable assessment row (``GRADED_COLUMNS``): its family, the referee's difficulty
    (Eq. 6) and verdict, and whether the student's and the teacher's answers are right. Empty for an assessment
    without scores (plain distillation draws its parents at random: no student answers, no referee)."""
    rows = [
        (
            row.instruction_id,
            spec.family,
            float(row.difficulty),
            bool(row.hard),
            student_right,
            bool(check_answer(scene, spec, row.teacher_answer)),
        )
        for row, scene, spec, student_right in scored_rows(assessment, scenes)
    ]
    return pd.DataFrame(rows, columns=list(GRADED_COLUMNS))


def grade_assessment(assessment: pd.DataFrame, scenes: dict[str, Scene]) -> dict[str, float]:
    """Counts for one assessment: scored readable rows, hard ones, and student / teacher right in each split."""
    counts: Counter = Counter()
    for row, scene, spec, student_right in scored_rows(assessment, scenes):
        split = "hard" if row.hard else "easy"
        counts["scored"] += 1
        counts[split] += 1
        counts[f"{split}_student_right"] += student_right
        counts[f"{split}_teacher_right"] += bool(check_answer(scene, spec, row.teacher_answer))
        verdict = "right" if student_right else "wrong"
        counts[f"student_{verdict}"] += 1
        counts[f"score_student_when_{verdict}"] += row.score_student
    return dict(counts)


__all__ = [
    "GRADED_COLUMNS",
    "SCENES_FILE",
    "assessment_files",
    "grade_assessment",
    "grade_conversations",
    "graded_assessment",
    "run_scenes",
    "scored_rows",
]
