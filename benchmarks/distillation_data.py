"""What each ablation arm fed the student: per iteration, the question families of its tuning data,
how many questions the world can read at all, and how often the teacher's answer was right; and whether
the assessment's "hard" marked what the student actually got wrong.

    .venv/bin/python benchmarks/distillation_data.py runs/ablation [--out benchmarks/results/x.md]

Reads every ``<variant>-seed<k>`` run under the ablation folder (``python -m mmdc.ablate``): the
conversations each tuning phase trained on (``train/iter_<k>/conversations.parquet``) graded against
the run's own world scenes (``data/world/scenes.jsonl``) with ``mmdc.world.outputs``. Only meaningful for
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
from collections import defaultdict
from pathlib import Path

import pandas as pd

from mmdc.world.outputs import assessment_files, grade_assessment, grade_conversations, run_scenes
from mmdc.world.scenes import FAMILIES

RUN = re.compile(r"^(?P<variant>.+)-seed(?P<seed>\d+)$")


def collect(root: Path) -> tuple[dict[str, dict[int, list[dict]]], dict[str, dict[int, list[dict]]]]:
    """({variant: {iteration: [taught counts per seed]}}, the same for assessments) over every run under ``root``."""
    taught: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    assessed: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in sorted(p for p in root.iterdir() if p.is_dir() and RUN.match(p.name)):
        scenes = run_scenes(run)
        if scenes is None:
            continue
        variant = RUN.match(run.name)["variant"]
        for conv in sorted((run / "train").glob("iter_*/conversations.parquet")):
            k = int(conv.parent.name.removeprefix("iter_"))
            taught[variant][k].append(grade_conversations(pd.read_parquet(conv), scenes))
        for k, parquet in assessment_files(run).items():
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
