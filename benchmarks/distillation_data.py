"""What each ablation arm fed the student: per iteration, the question families of its tuning data,
how many questions the world can read at all, and how often the teacher's answer was right.

    .venv/bin/python benchmarks/distillation_data.py runs/ablation [--out benchmarks/results/x.md]

Reads every ``<variant>-seed<k>`` run under the ablation folder (``python -m mmdc.ablate``): the
conversations each tuning phase trained on (``train/iter_<k>/conversations.parquet``) graded against
the run's own world scenes (``data/world/scenes.jsonl``) with ``mmdc.data.world``. Only meaningful for
runs on the embedded world (``data.source: world``). Why it exists: when calibration and plain
distillation differ in student accuracy, this says whether they differed in what they taught.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd

from mmdc.data.world import FAMILIES, check_answer, load_scenes, parse_question

RUN = re.compile(r"^(?P<variant>.+)-seed(?P<seed>\d+)$")


def grade_iteration(conversations: pd.DataFrame, scenes: dict) -> dict[str, float]:
    """Counts for one tuning phase: rows, readable questions, teacher right, and rows per family."""
    counts: Counter = Counter()
    for image_id, questions, answers in zip(conversations["image_id"], conversations["questions"],
                                            conversations["answers"]):
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


def collect(root: Path) -> dict[str, dict[int, list[dict]]]:
    """{variant: {iteration: [counts per seed]}} over every finished run folder under ``root``."""
    out: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in sorted(p for p in root.iterdir() if p.is_dir() and RUN.match(p.name)):
        scenes_file = run / "data" / "world" / "scenes.jsonl"
        if not scenes_file.is_file():
            continue
        scenes = load_scenes(scenes_file)
        for conv in sorted((run / "train").glob("iter_*/conversations.parquet")):
            k = int(conv.parent.name.removeprefix("iter_"))
            out[RUN.match(run.name)["variant"]][k].append(grade_iteration(pd.read_parquet(conv), scenes))
    return out


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {sd:.1f}"


def table(data: dict[str, dict[int, list[dict]]]) -> str:
    """Markdown: one row per (variant, iteration), mean ± sd over seeds."""
    head = ["variant", "iteration", "seeds", "QA pairs", "readable %", "teacher right % (of readable)",
            *(f"{f} %" for f in FAMILIES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, per_iter in data.items():
        for k in sorted(per_iter):
            runs = per_iter[k]
            readable = [r.get("readable", 0) for r in runs]
            cells = [variant, str(k), str(len(runs)), _mean_sd([r.get("rows", 0) for r in runs]),
                     _mean_sd([100 * r.get("readable", 0) / r["rows"] for r in runs if r.get("rows")]),
                     _mean_sd([100 * r.get("right", 0) / n for r, n in zip(runs, readable) if n])]
            cells += [_mean_sd([100 * r.get(f, 0) / n for r, n in zip(runs, readable) if n]) for f in FAMILIES]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="the ablation folder (python -m mmdc.ablate --out)")
    p.add_argument("--out", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    text = table(collect(args.root))
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
