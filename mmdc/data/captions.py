"""Stage 1's caption pairs (paper 3.2): read them, check their images, and filter them as configured.

Like the instruction images in ``prepare``, every caption image is checked before training (inside its
folder, then opened; ``parallel``: in Ray Data tasks), so one corrupt file among 558K is a recorded skip,
not a crash in a training worker. The CLIP-score filter (optional extra) runs next, then the noun-phrase
filter; both are recorded: skipped pairs with their reason, and counts for the phase record (``clip_*``,
``filter_*``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from mmdc.config import DataConfig
from mmdc.data.blocks import find_problems
from mmdc.data.images import image_problem, resolve_image
from mmdc.data.llava import load_caption_pairs
from mmdc.data.skips import SkipCount, check_skip_ratio


@dataclass
class CaptionPairs:
    """The pairs stage 1 trains on (``id``, absolute ``image``, ``caption``), what was skipped, and counts."""

    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    counts: list[SkipCount] = field(default_factory=list)  # what ``check_skip_ratio`` weighs

    def check_skip_ratio(self, limit: float) -> None:
        """Stop (TooMuchBadInput) when more than ``limit`` of the records or of the images were unusable."""
        check_skip_ratio(self.counts, limit)


def stage1_pairs(
    captions: str, image_root: str | None, data: DataConfig, seed: int, *, parallel: bool = False
) -> CaptionPairs:
    """The caption pairs of ``captions`` with images under ``image_root``, checked, through ``data``'s filters."""
    loaded = load_caption_pairs(captions)
    pairs = CaptionPairs([], [{"stage": "captions", **skip} for skip in loaded.skipped])
    check = partial(image_problem, image_root=image_root, max_pixels=data.max_image_pixels)
    images = [pair["image"] for pair in loaded.records]
    bad = find_problems(images, check, parallel=parallel)
    for pair in loaded.records:
        if pair["image"] in bad:
            pairs.skipped.append(
                {"stage": "caption_image", "id": pair["id"], "image": pair["image"], "reason": bad[pair["image"]]}
            )
        else:
            pairs.rows.append({**pair, "image": resolve_image(pair["image"], image_root)})
    records = len(loaded.records) + len(loaded.skipped)
    bad_pairs = len(loaded.records) - len(pairs.rows)
    pairs.stats.update(
        pairs=records, skipped_records=len(loaded.skipped), images_checked=len(set(images)), skipped_images=len(bad)
    )
    first_record = f"record {loaded.skipped[0]['index']}: {loaded.skipped[0]['reason']}" if loaded.skipped else ""
    pairs.counts = [
        SkipCount(f"records of {captions}", len(loaded.skipped), records, first_record),
        SkipCount(
            f"caption pairs' images under {image_root}", bad_pairs, len(loaded.records), next(iter(bad.values()), "")
        ),
    ]
    if data.clip_filter.enabled:
        from mmdc.data.clipscore import filter_by_clip_score  # needs the optional clip extra

        clip = filter_by_clip_score(pairs.rows, data.clip_filter, data.max_image_pixels)
        pairs.skipped += [{"stage": "clip_filter", **skip} for skip in clip.skipped]
        pairs.rows = clip.kept
        pairs.stats.update({f"clip_{k}": v for k, v in clip.stats.items()})
    nounphrase = data.caption_filter
    if nounphrase.enabled:
        from mmdc.data.nounphrase import filter_caption_pairs  # loads spaCy

        pairs.rows, stats = filter_caption_pairs(
            pairs.rows,
            nounphrase.spacy_pipeline,
            seed=seed,
            n_process=nounphrase.n_process,
            min_count=nounphrase.min_count,
            max_per_phrase=nounphrase.max_per_phrase,
        )
        pairs.stats.update({f"filter_{k}": v for k, v in stats.items()})
    return pairs
