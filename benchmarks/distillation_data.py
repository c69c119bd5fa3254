"""What each ablation arm fed the student: per iteration, the question families of its tuning data,
how many questions the world can read at all, and how often the teacher's answer was right; and whether
the assessment's "hard" marked what the student actually got wrong.

    .venv/bin/python benchmarks/distillation_data.py runs/ablation [--out benchmarks/results/x.md]

Reads every ``<variant>-seed<k>`` run under the ablation folder (``python -m mmdc.ablate``): the
conversations each tuning phase trained on (``train/iter_<k>/conversations.parquet``) graded against
the run's own world scenes (``data/world/scenes.jsonl``) with ``mmdc.world.scenes``. Only meaningful for
runs on the embedded world (``data.source: world``). Why it exists: when calibration and plain
distillation differ in student accuracy, this says whether they differed in what they taught. The second
table grades each assessment (``assessments/iter_<k>.parquet``) the same way: the student's and the
teacher's answers against the truth, split by the referee's hard / easy verdict (Eq. 6), so it says whether
"hard" found the student's mistakes (an informative referee: more student mistakes among hard rows).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from mmdc.world.scenes import FAMILIES, QuestionSpec, Scene, check_answer, load_scenes, parse_question

RUN = re.compile(r"^(?P<variant>.+)-seed(?P<seed>\d+)$")


def grade_iteration(conversations: pd.DataFrame, scenes: dict) -> dict[str, float]:
    """Counts for one tuning phase: rows, readable questions, teacher right, and rows per family."""
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


def scored_rows(assessments: pd.DataFrame, scenes: dict) -> Iterator[tuple[Any, Scene, QuestionSpec, bool]]:
    """(row, scene, spec, student right) for each assessment row that was scored and that the world can read."""
    for row in assessments.itertuples(index=False):
        spec = parse_question(row.question)
        if spec is None or pd.isna(row.difficulty):
            continue
        scene = scenes[row.image_id]
        yield row, scene, spec, bool(check_answer(scene, spec, row.student_answer))


def grade_assessment(assessments: pd.DataFrame, scenes: dict) -> dict[str, float]:
    """Counts for one assessment: scored readable rows, hard ones, and student / teacher right in each split."""
    counts: Counter = Counter()
    for row, scene, spec, student_right in scored_rows(assessments, scenes):
        split = "hard" if row.hard else "easy"
        counts["scored"] += 1
        counts[split] += 1
        counts[f"{split}_student_right"] += student_right
        counts[f"{split}_teacher_right"] += bool(check_answer(scene, spec, row.teacher_answer))
        verdict = "right" if student_right else "wrong"
        counts[f"student_{verdict}"] += 1
        counts[f"score_student_when_{verdict}"] += row.score_student
    return dict(counts)


def collect(root: Path) -> tuple[dict[str, dict[int, list[dict]]], dict[str, dict[int, list[dict]]]]:
    """({variant: {iteration: [taught counts per seed]}}, the same for assessments) over every run under ``root``."""
    taught: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    assessed: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in sorted(p for p in root.iterdir() if p.is_dir() and RUN.match(p.name)):
        scenes_file = run / "data" / "world" / "scenes.jsonl"
        if not scenes_file.is_file():
            continue
        scenes = load_scenes(scenes_file)
        variant = RUN.match(run.name)["variant"]
        for conv in sorted((run / "train").glob("iter_*/conversations.parquet")):
            k = int(conv.parent.name.removeprefix("iter_"))
            taught[variant][k].append(grade_iteration(pd.read_parquet(conv), scenes))
        for parquet in sorted((run / "assessments").glob("iter_*.parquet")):
            k = int(parquet.stem.removeprefix("iter_"))
            assessed[variant][k].append(grade_assessment(pd.read_parquet(parquet), scenes))
    return taught, assessed


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {sd:.1f}"


def table(data: dict[str, dict[int, list[dict]]]) -> str:
    """Markdown: one row per (variant, iteration), mean ± sd over seeds."""
    head = [
        "variant",
        "iteration",
        "seeds",
        "QA pairs",
        "readable %",
        "teacher right % (of readable)",
        *(f"{f} %" for f in FAMILIES),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, per_iter in data.items():
        for k in sorted(per_iter):
            runs = per_iter[k]
            readable = [r.get("readable", 0) for r in runs]
            cells = [
                variant,
                str(k),
                str(len(runs)),
                _mean_sd([r.get("rows", 0) for r in runs]),
                _mean_sd([100 * r.get("readable", 0) / r["rows"] for r in runs if r.get("rows")]),
                _mean_sd([100 * r.get("right", 0) / n for r, n in zip(runs, readable) if n]),
            ]
            cells += [_mean_sd([100 * r.get(f, 0) / n for r, n in zip(runs, readable) if n]) for f in FAMILIES]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def assessment_table(data: dict[str, dict[int, list[dict]]]) -> str:
    """Markdown: one row per (variant, assessment), mean ± sd over seeds; '–' where a split was empty."""
    head = [
        "variant",
        "assessment",
        "seeds",
        "scored rows",
        "hard %",
        "student right % (all)",
        "student right % among hard",
        "... among easy",
        "teacher right % among hard",
        "... among easy",
        "referee's student score, student right",
        "... student wrong",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def share(runs: list[dict], num: str, den: str) -> str:
        return _mean_sd([100 * r.get(num, 0) / r[den] for r in runs if r.get(den)])

    def mean_score(runs: list[dict], verdict: str) -> str:
        return _mean_sd(
            [r[f"score_student_when_{verdict}"] / r[f"student_{verdict}"] for r in runs if r.get(f"student_{verdict}")]
        )

    for variant, per_iter in data.items():
        if not any(r.get("scored") for runs in per_iter.values() for r in runs):
            continue  # no assessment (plain distillation)
        for k in sorted(per_iter):
            runs = per_iter[k]
            cells = [
                variant,
                str(k),
                str(len(runs)),
                _mean_sd([r.get("scored", 0) for r in runs]),
                share(runs, "hard", "scored"),
                share(runs, "student_right", "scored"),
                share(runs, "hard_student_right", "hard"),
                share(runs, "easy_student_right", "easy"),
                share(runs, "hard_teacher_right", "hard"),
                share(runs, "easy_teacher_right", "easy"),
                mean_score(runs, "right"),
                mean_score(runs, "wrong"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="the ablation folder (python -m mmdc.ablate --out)")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    taught, assessed = collect(args.root)
    text = table(taught) + "\n" + assessment_table(assessed)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
