"""Benchmark of the calibration maths at paper-like scale: assessment, ROUGE-L validity, pool update.

Builds 100K synthetic cache-pool rows (3-10 questions per image, synthetic
referee replies in the shapes real referees write, about half of them hard),
then times, on one core of this machine:

1. assess:   parse both referee replies + combine orders + Eq. 6 + tau split (mmdc.data.calibration.assess_table)
2. validate: ROUGE-L validity of one generated candidate per hard row against both pools
             (mmdc.data.augment.validate_candidates)
3. baseline: the same ROUGE-L check done naively, RougeScorer.score per (candidate, question) pair,
             on a subset of candidates, compared with (2) on the same subset -> speed-up ratio
4. update:   both pool-update policies (mmdc.data.pools.update_pools) and folding into conversations

Run from the repository root:

    .venv/bin/python benchmarks/calibration_math.py   # 100K rows, writes benchmarks/results/calibration_math.md
    .venv/bin/python benchmarks/calibration_math.py --rows 20000 --baseline 1000 --no-write

It takes about a minute on 2 cores (each step runs 3 times; the fastest run is reported).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from rouge_score import rouge_scorer

from mmdc.data.augment import contains_answer, is_one_sentence, validate_candidates
from mmdc.data.calibration import assess_table
from mmdc.data.pools import fold_conversations, update_pools
from mmdc.data.schema import POOL_SCHEMA, generated_instruction_id, seed_instruction_id

TAU = 0.33
RESULTS = Path(__file__).parent / "results" / "calibration_math.md"

_SUBJECTS = ["man", "woman", "dog", "cat", "car", "bus", "child", "bird", "horse", "boat", "table", "train", "kite"]
_ATTRS = ["color", "size", "shape", "position", "number", "material", "purpose", "condition", "age", "mood"]
_PLACES = ["in the picture", "near the road", "on the left", "in the background", "on the table", "by the water"]
_TEMPLATES = [
    "What is the {a} of the {s} {p}?",
    "How many {s}s are {p}?",
    "Why might the {s} be {p}?",
    "What is the {s} doing {p}?",
    "Describe the {a} of the {s} {p}.",
    "Is the {s} {p} likely to move soon?",
    "What can you infer about the {a} of the {s}?",
    "Where is the {s} relative to the other objects {p}?",
]
_REPLY_FORMS = [
    "The scores for Assistant 1 and 2 are {a} and {b}, respectively.",
    "{a} {b}\nAssistant 1 gives a more detailed answer than Assistant 2.",
    "Assistant 1: {a}\nAssistant 2: {b}",
    "{a}/10 and {b}/10",
    "Sure. The scores for Assistant 1 and Assistant 2 are {a} and {b}. Both mention the {s}.",
]


def _question(rng: np.random.Generator) -> str:
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    return template.format(
        a=_ATTRS[rng.integers(len(_ATTRS))],
        s=_SUBJECTS[rng.integers(len(_SUBJECTS))],
        p=_PLACES[rng.integers(len(_PLACES))],
    )


def build_cache(rows: int, rng: np.random.Generator) -> pa.Table:
    """Seed pool rows: images with 3-10 questions each, until ``rows`` rows."""
    cols: dict[str, list] = {name: [] for name in POOL_SCHEMA.names}
    image = 0
    while len(cols["instruction_id"]) < rows:
        per_image = int(rng.integers(3, 11))
        source = f"src{image:06d}"
        for turn in range(min(per_image, rows - len(cols["instruction_id"]))):
            cols["instruction_id"].append(seed_instruction_id(source, turn))
            cols["image_id"].append(f"img{image:06d}")
            cols["image"].append(f"images/img{image:06d}.jpg")
            cols["question"].append(_question(rng))
            cols["origin"].append("seed")
            cols["parent_id"].append(None)
            cols["iteration"].append(0)
            cols["turn"].append(turn)
            cols["image_position"].append("before" if turn == 0 else "none")
            cols["source_id"].append(source)
        image += 1
    return pa.Table.from_pydict(cols, schema=POOL_SCHEMA)


def build_replies(cache: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Assessment input: answers and two referee replies per row; ~half hard at tau 0.33, ~1% unparseable."""
    n = len(cache)
    hard = rng.random(n) < 0.5
    teacher = rng.integers(6, 11, n)
    # hard: the student trails by 3+ points (or both fail); easy: within a point of the teacher.
    gap = np.where(hard, rng.integers(3, 6, n), rng.integers(0, 2, n))
    student = np.clip(teacher - gap, 1, 10)
    forms = rng.integers(len(_REPLY_FORMS), size=(n, 2))
    broken = rng.random(n) < 0.01
    first, second = [], []
    for i in range(n):
        t, s = int(teacher[i]), int(student[i])
        first.append(_REPLY_FORMS[forms[i, 0]].format(a=t, b=s, s="dog"))
        second.append("I cannot tell." if broken[i] else _REPLY_FORMS[forms[i, 1]].format(a=s, b=t, s="dog"))
    return pd.DataFrame(
        {
            "instruction_id": cache["instruction_id"].to_numpy(),
            "image_id": cache["image_id"].to_numpy(),
            "question": cache["question"].to_numpy(),
            "teacher_answer": "The teacher's answer.",
            "student_answer": "The student's answer.",
            "reply_teacher_first": first,
            "reply_student_first": second,
        }
    )


def build_candidates(hard_rows: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """One generated question per hard row: new questions, near-copies of the parent, and malformed replies."""
    questions = []
    kinds = rng.random(len(hard_rows))
    for parent, kind in zip(hard_rows["question"].tolist(), kinds):
        if kind < 0.25:
            words = parent.split()
            words[int(rng.integers(len(words)))] = "blue"
            questions.append(" ".join(words))  # near-copy: usually too similar
        elif kind < 0.30:
            questions.append(_question(rng).rstrip("?.") + "? It is a dog.")
        else:
            questions.append(_question(rng))
    return pd.DataFrame(
        {
            "instruction_id": [generated_instruction_id(p, 1, 0) for p in hard_rows["instruction_id"]],
            "image_id": hard_rows["image_id"].to_numpy(),
            "question": questions,
            "parent_id": hard_rows["instruction_id"].to_numpy(),
        }
    )


def naive_rouge(candidates: pd.DataFrame, existing: pd.DataFrame, threshold: float = 0.7) -> np.ndarray:
    """The obvious implementation: RougeScorer.score for every (question of the image, candidate) pair."""
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    by_image = existing.groupby("image_id")["question"].agg(list).to_dict()
    accepted: dict[str, list[str]] = {}
    best_all = np.zeros(len(candidates))
    ordered = candidates.sort_values(["image_id", "instruction_id"])
    position = {iid: i for i, iid in enumerate(candidates["instruction_id"])}
    for iid, image_id, question in zip(ordered["instruction_id"], ordered["image_id"], ordered["question"]):
        others = by_image.get(image_id, []) + accepted.get(image_id, [])
        best = max((scorer.score(o, question)["rougeL"].fmeasure for o in others), default=0.0)
        best_all[position[iid]] = best
        if best < threshold and is_one_sentence(question) and not contains_answer(question):
            accepted.setdefault(image_id, []).append(question)
    return best_all


def timed(fn, repeat: int):
    """(value, best wall seconds over ``repeat`` runs): the minimum filters out noise from other jobs on the machine."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return value, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="cache-pool rows to synthesise")
    parser.add_argument("--baseline", type=int, default=3_000, help="candidates checked by the naive baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per step; the fastest is reported")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write the results file")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    cache_table = build_cache(args.rows, rng)
    cache = cache_table.to_pandas()
    assess_in = build_replies(cache, rng)
    results: list[tuple[str, int, float]] = []  # (step, rows, seconds)

    assessment, t_assess = timed(lambda: assess_table(assess_in, TAU), args.repeat)
    results.append(("assess: parse 2 replies + combine + Eq. 6 + split", len(assess_in), t_assess))
    hard_rows = assessment[assessment["hard"].eq(True).fillna(False).to_numpy(dtype=bool)]
    n_hard = len(hard_rows)
    unscored = int(assessment["hard"].isna().sum())

    candidates = build_candidates(hard_rows, rng)
    # Both pools (iteration 1: tuning == cache), as the driver would pass them.
    existing = pd.concat([cache[["instruction_id", "image_id", "question"]]] * 2, ignore_index=True)
    validated, t_validate = timed(lambda: validate_candidates(candidates, existing), args.repeat)
    results.append(("validate: ROUGE-L vs both pools, 1 candidate / hard row", len(candidates), t_validate))

    # Naive baseline vs ours on the same subset: whole images, so the in-round comparisons are the same.
    subset_images = candidates["image_id"].drop_duplicates().iloc[: max(1, args.baseline // 3)]
    subset = candidates[candidates["image_id"].isin(subset_images)].iloc[: args.baseline]
    subset = subset[subset["image_id"].isin(subset["image_id"].unique())]
    sub_existing = cache[cache["image_id"].isin(subset["image_id"])][["image_id", "question"]]
    ours_sub, t_ours_sub = timed(lambda: validate_candidates(subset, sub_existing), args.repeat)
    naive_sub, t_naive_sub = timed(lambda: naive_rouge(subset, sub_existing), args.repeat)
    same = np.array_equal(ours_sub["rouge_l_max"].to_numpy(), naive_sub)
    results.append((f"baseline subset, ours (identical max ROUGE-L: {same})", len(subset), t_ours_sub))
    results.append(("baseline subset, naive RougeScorer.score per pair", len(subset), t_naive_sub))

    accepted_c = validated[validated["accepted"]]
    parents = cache.set_index("instruction_id").loc[accepted_c["parent_id"]]
    accepted_rows = pa.Table.from_pydict(
        {
            "instruction_id": accepted_c["instruction_id"].tolist(),
            "image_id": accepted_c["image_id"].tolist(),
            "image": parents["image"].tolist(),
            "question": accepted_c["question"].tolist(),
            "origin": ["generated"] * len(accepted_c),
            "parent_id": accepted_c["parent_id"].tolist(),
            "iteration": [1] * len(accepted_c),
            "turn": [-1] * len(accepted_c),
            "image_position": ["none"] * len(accepted_c),
            "source_id": parents["source_id"].tolist(),
        },
        schema=POOL_SCHEMA,
    )
    (_, _, counts_refresh), t_refresh = timed(
        lambda: update_pools("refresh", cache_table, cache_table, assessment, accepted_rows, args.seed, 1),
        args.repeat,
    )
    results.append(("update_pools refresh", cache_table.num_rows, t_refresh))
    (_, _, counts_replace), t_replace = timed(
        lambda: update_pools("replace", cache_table, cache_table, assessment, accepted_rows, args.seed, 1),
        args.repeat,
    )
    results.append(("update_pools replace", cache_table.num_rows, t_replace))
    answered = cache.assign(answer="An answer.")
    folded, t_fold = timed(lambda: fold_conversations(answered), args.repeat)
    results.append(("fold_conversations (Eq. 1)", len(answered), t_fold))

    ratio = t_naive_sub / t_ours_sub if t_ours_sub else float("nan")
    total = t_assess + t_validate + t_refresh + t_fold
    lines = [
        "| step | rows | seconds | rows/s |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {rows:,} | {sec:.3f} | {rows / sec:,.0f} |" for name, rows, sec in results],
    ]
    summary = [
        f"- cache rows: {len(cache):,} over {cache['image_id'].nunique():,} images; "
        f"hard {n_hard:,} ({n_hard / len(cache):.1%}), unscored {unscored:,}",
        f"- candidates accepted: {int(validated['accepted'].sum()):,} / {len(validated):,}; reasons: "
        + ", ".join(f"{k} {v:,}" for k, v in validated["reject_reason"].value_counts().items()),
        f"- refresh: next tuning {counts_refresh['tuning_after']:,} rows "
        f"({counts_refresh['accepted']:,} new + {counts_refresh['easy_sampled']:,} easy); "
        f"replace: {counts_replace['tuning_after']:,} rows ({counts_replace['parents_replaced']:,} parents replaced)",
        f"- conversations folded: {len(folded):,}",
        f"- ROUGE-L speed-up over the naive pairwise baseline on the same {len(subset):,} candidates: **{ratio:.1f}x**",
        f"- one iteration's calibration maths (assess + validate + refresh + fold): {total:.1f} s",
    ]
    print("\n".join(lines + [""] + summary))
    if not args.no_write:
        cpu = (
            next(
                (
                    line.split(":", 1)[1].strip()
                    for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")
                ),
                platform.processor() or "unknown",
            )
            if Path("/proc/cpuinfo").exists()
            else platform.processor()
        )
        command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            "# Calibration maths benchmark\n\n"
            f"Command: `{command}` (from the repository root)\n\n"
            f"Machine: {os.cpu_count()} CPUs (nproc), {cpu}; Python {platform.python_version()}, "
            f"pandas {pd.__version__}, pyarrow {pa.__version__}. Single process, one core used; each step run "
            f"{args.repeat}x, fastest reported (the machine is shared with other jobs).\n\n"
            + "\n".join(lines)
            + "\n\n"
            + "\n".join(summary)
            + "\n"
        )
        print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
