"""Stage 1's caption pairs (paper 3.2): read them, resolve their images, and filter them as configured.

The CLIP-score filter (optional extra) runs first, then the noun-phrase filter; both are recorded:
skipped pairs with their reason, and counts for the phase record (``clip_*``, ``filter_*``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmdc.config import DataConfig
from mmdc.data.images import resolve_image
from mmdc.data.llava import load_caption_pairs


@dataclass
class CaptionPairs:
    """The pairs stage 1 trains on (``id``, absolute ``image``, ``caption``), what was skipped, and counts."""

    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def stage1_pairs(captions: str, image_root: str | None, data: DataConfig, seed: int) -> CaptionPairs:
    """The caption pairs of ``captions`` with images under ``image_root``, through ``data``'s filters."""
    rows = [{**pair, "image": resolve_image(pair["image"], image_root)} for pair in load_caption_pairs(captions)]
    pairs = CaptionPairs(rows)
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
