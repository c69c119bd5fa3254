"""Where the augmentor's rejected "duplicate" candidates come from, per run and iteration.

    .venv/bin/python benchmarks/augment_duplicates.py runs/calibration/mmdc-seed0 [RUN ...]

A candidate is a duplicate when its text is already a question of the same image in the pools. Since the
augmentor's sampling seed includes the iteration (issue 24), a parent that stays hard gets a fresh sample every
iteration; a duplicate can still come from the teacher's own narrow distribution. This splits each iteration's
duplicates by what they repeat: the question this parent's earlier child already asked (the same sample drawn
again under a new seed), an original question of the image (``pools/iter_0``), or another generated question;
and counts the parents that were parents before (still hard). Reads only ``generated/iter_<k>.parquet`` and
``pools/iter_0/cache.parquet`` of each run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def duplicate_sources(run: Path) -> list[dict]:
    """One row per iteration: candidates, duplicates, and what the duplicates repeat."""
    generated = {
        int(p.stem.split("_")[1]): pd.read_parquet(p)
        for p in sorted(run.glob("generated/iter_*.parquet"))
        if p.stem.split("_")[1].isdigit()
    }
    originals = pd.read_parquet(run / "pools" / "iter_0" / "cache.parquet")
    by_image = originals.groupby("image_id")["question"].apply(lambda qs: {_norm(q) for q in qs}).to_dict()
    rows = []
    for k in sorted(generated):
        now = generated[k]
        before = pd.concat([generated[j] for j in generated if j < k]) if k > min(generated) else now.iloc[:0]
        earlier = before.groupby("parent_id")["question"].apply(lambda qs: {_norm(q) for q in qs}).to_dict()
        dup = now[now["reject_reason"] == "duplicate"]
        same_child = sum(_norm(r.question) in earlier.get(r.parent_id, set()) for r in dup.itertuples())
        original = sum(
            _norm(r.question) in by_image.get(r.image_id, set())
            and _norm(r.question) not in earlier.get(r.parent_id, set())
            for r in dup.itertuples()
        )
        rows.append(
            {
                "run": run.name,
                "iteration": k,
                "candidates": len(now),
                "parents_hard_before": int(now["parent_id"].isin(before["parent_id"]).sum()),
                "duplicates": len(dup),
                "same_as_parents_earlier_child": same_child,
                "an_original_question": original,
                "another_generated_question": len(dup) - same_child - original,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    rows = [row for run in args.runs for row in duplicate_sources(run)]
    if not rows:
        print("no generated/iter_*.parquet under the runs given", file=sys.stderr)
        return 1
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
