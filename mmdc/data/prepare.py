"""D_sin from a LLaVA-Instruct file: unfold to single-turn questions, check every image once, cap, validate.

Every image is checked here (inside its folder, then opened), before any engine or trainer starts: a bad
image is a recorded skip, not a crash in the middle of a GPU phase. ``parallel`` checks the images in Ray
Data tasks (``blocks.find_problems``); the pool is the same either way. Image references stay relative to
``image_root``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyarrow as pa

from mmdc.data.blocks import find_problems
from mmdc.data.images import image_problem
from mmdc.data.llava import load_llava_records, unfold_single_turn
from mmdc.data.schema import pool_from_frame
from mmdc.data.skips import SkipCount, check_skip_ratio


@dataclass
class SeedPool:
    """D_sin as a validated pool, what was skipped on the way (one dict per skip) and counts for the phase record."""

    table: pa.Table
    skipped: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    counts: list[SkipCount] = field(default_factory=list)  # what ``check_skip_ratio`` weighs

    def check_skip_ratio(self, limit: float) -> None:
        """Stop (TooMuchBadInput) when more than ``limit`` of the records or of the images were unusable."""
        check_skip_ratio(self.counts, limit)


def prepare_seed_pool(
    instructions: str,
    image_root: str | None,
    *,
    max_instructions: int | None,
    max_image_pixels: int,
    parallel: bool = False,
) -> SeedPool:
    """Load ``instructions``, unfold them, drop the rows whose image does not load, keep the first ``max_instructions``
    by instruction id. The table may be empty (everything skipped): the caller records the skips, then stops."""
    loaded = load_llava_records(instructions, strict=False)
    skipped = [{"stage": "load", **skip} for skip in loaded.skipped]
    pool, unfold_skips = unfold_single_turn(loaded.records, None)  # images stay relative to image_root
    skipped += [{"stage": "unfold", **skip} for skip in unfold_skips]
    frame = pool.to_pandas()
    images = list(frame["image"].unique())
    check = partial(image_problem, image_root=image_root, max_pixels=max_image_pixels)
    bad = find_problems(images, check, parallel=parallel)
    if bad:
        dropped = frame[frame["image"].isin(bad)]
        skipped += [
            {"stage": "image", "instruction_id": row.instruction_id, "image": row.image, "reason": bad[row.image]}
            for row in dropped.itertuples()
        ]
        frame = frame[~frame["image"].isin(bad)]
    frame = frame.sort_values("instruction_id", kind="stable")
    if max_instructions is not None:
        frame = frame.head(max_instructions)
    records = len(loaded.records) + len(loaded.skipped)
    stats = {
        "rows": len(frame),
        "images": int(frame["image_id"].nunique()),
        "records": records,
        "images_checked": len(images),
        "skipped_images": len(bad),
        "skipped_rows": len(loaded.skipped) + len(unfold_skips),
    }
    counts = [
        SkipCount(f"records of {instructions}", len(loaded.skipped), records, _first_reason(loaded.skipped)),
        SkipCount(f"images under {image_root}", len(bad), len(images), next(iter(bad.values()), "")),
    ]
    return SeedPool(pool_from_frame(frame, "D_sin"), skipped, stats, counts)


def _first_reason(skips: list[dict[str, Any]]) -> str:
    return f"record {skips[0]['index']}: {skips[0]['reason']}" if skips else ""
