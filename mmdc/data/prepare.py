"""D_sin from a LLaVA-Instruct file: unfold to single-turn questions, check every image once, cap, validate.

Every image is opened here, before any engine or trainer starts: a bad image is a recorded skip, not
a crash in the middle of a GPU phase. Image references stay relative to ``image_root``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from mmdc.data.images import ImageError, load_image, resolve_image
from mmdc.data.llava import load_llava_records, unfold_single_turn
from mmdc.data.schema import pool_from_frame


@dataclass
class SeedPool:
    """D_sin as a validated pool, what was skipped on the way (one dict per skip) and counts for the phase record."""

    table: pa.Table
    skipped: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)


def prepare_seed_pool(
    instructions: str, image_root: str | None, *, max_instructions: int | None, max_image_pixels: int
) -> SeedPool:
    """Load ``instructions``, unfold them, drop the rows whose image does not load, keep the first ``max_instructions``
    by instruction id. The table may be empty (everything skipped): the caller records the skips, then stops."""
    loaded = load_llava_records(instructions, strict=False)
    skipped = [{"stage": "load", **skip} for skip in loaded.skipped]
    pool, unfold_skips = unfold_single_turn(loaded.records, None)  # images stay relative to image_root
    skipped += [{"stage": "unfold", **skip} for skip in unfold_skips]
    frame = pool.to_pandas()
    bad: dict[str, str] = {}
    for image in frame["image"].unique():
        try:
            load_image(resolve_image(image, image_root), max_pixels=max_image_pixels)
        except ImageError as err:
            bad[image] = str(err)
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
    stats = {
        "rows": len(frame),
        "images": int(frame["image_id"].nunique()),
        "skipped_images": len(bad),
        "skipped_rows": len(loaded.skipped) + len(unfold_skips),
    }
    return SeedPool(pool_from_frame(frame, "D_sin"), skipped, stats)
