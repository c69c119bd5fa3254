"""Stage 1 image-text similarity filter: keep caption pairs whose CLIP score clears a threshold.

LAION built its sets this way: embed the image and the caption with a CLIP model and drop pairs
whose cosine similarity is below a threshold (0.28 for LAION-5B's English pairs with OpenAI's
ViT-B/32, 0.3 for LAION-400M). The paper's stage 1 data (CC3M, SBU, LAION) is already filtered
like that; this filter lets a user apply the same rule to their own pairs before the noun-phrase
filter (``data.clip_filter``, off by default).

Optional: it needs ``open_clip_torch``, which pulls ``torchvision`` (``pip install "mmdc[clip]"``
with a torch that has a matching torchvision build; see the README for why CI runs it in a second
environment). Nothing here imports open_clip until a scorer is built.

Scoring runs over Ray Data: ``ClipScorer`` is a callable class, one model per actor, with
``data.clip_filter.concurrency`` actors and their CPUs / GPUs from config. A pair whose image
cannot be read is not scored; it is returned as a skip with the reason (the driver writes it to
``skipped.jsonl``), and every other pair keeps its place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from mmdc.config import ClipFilterConfig
from mmdc.data.images import DEFAULT_MAX_PIXELS, ImageError, load_image

if TYPE_CHECKING:
    import torch

INSTALL_HINT = (
    'data.clip_filter needs open_clip_torch (and torchvision): pip install "mmdc[clip]" with a torch '
    "that has a matching torchvision build, e.g. torch==2.14.1 torchvision==0.29.1 (see the README)"
)
SCORE, ERROR = "clip_score", "clip_error"


class ClipFilterUnavailable(ImportError):
    """open_clip (or torchvision under it) is not importable; the message says what to install."""


def check_open_clip(model: str, model_config: str | None = None) -> Any:
    """The ``open_clip`` module, once it imports and knows ``model``; cheap, so the driver checks before any actor."""
    try:
        import open_clip
    except ImportError as err:  # torchvision built for another torch fails here too
        raise ClipFilterUnavailable(f"{INSTALL_HINT} ({err})") from err
    if model_config:
        open_clip.add_model_config(model_config)
    if model not in open_clip.list_models():
        raise ValueError(
            f"data.clip_filter.model {model!r} is not an open_clip model "
            "(see open_clip.list_models(), or register one with data.clip_filter.model_config)"
        )
    return open_clip


def load_open_clip(
    model: str, pretrained: str | None, model_config: str | None = None, device: str = "cpu"
) -> tuple[Any, Any, Any]:
    """``(model, preprocess, tokenizer)`` from open_clip, in eval mode on ``device``.

    ``pretrained`` is an open_clip tag (``openai``, ``laion2b_s34b_b79k``; downloaded by open_clip on
    first use) or a local checkpoint file; None means random weights, which only tests want.
    ``model_config``: a JSON model config file (or folder of them) registered first, for a model
    open_clip does not ship.
    """
    open_clip = check_open_clip(model, model_config)
    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained or None, device=device)
    net.eval()
    return net, preprocess, open_clip.get_tokenizer(model)


def cosine_scores(image_features: torch.Tensor, text_features: torch.Tensor) -> list[float]:
    """Row-wise cosine similarity of paired embeddings (what LAION thresholds), in [-1, 1]."""
    import torch.nn.functional as F

    return F.cosine_similarity(image_features.float(), text_features.float(), dim=-1).tolist()


class ClipScorer:
    """Ray Data callable class: adds ``clip_score`` (NaN when unscored) and ``clip_error`` to a pandas batch."""

    def __init__(
        self,
        model: str,
        pretrained: str | None,
        model_config: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        use_gpu: bool = False,
    ):
        import torch

        torch.set_num_threads(1)  # one actor per core; Ray gives each actor its CPUs
        self.device = "cuda" if use_gpu else "cpu"
        self.model, self.preprocess, self.tokenizer = load_open_clip(model, pretrained, model_config, self.device)
        self.max_pixels = max_image_pixels

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        pixels, captions, rows = [], [], []
        errors: list[str | None] = [None] * len(batch)
        for i, (path, caption) in enumerate(zip(batch["image"], batch["caption"])):
            try:
                pixels.append(self.preprocess(load_image(path, self.max_pixels)))
            except ImageError as err:
                errors[i] = str(err)
                continue
            captions.append(caption)
            rows.append(i)
        scores = [math.nan] * len(batch)
        if rows:
            with torch.no_grad():
                images = self.model.encode_image(torch.stack(pixels).to(self.device))
                texts = self.model.encode_text(self.tokenizer(captions).to(self.device))
            for i, s in zip(rows, cosine_scores(images, texts)):
                scores[i] = s
        out = batch.copy()
        out[SCORE] = scores
        out[ERROR] = errors
        return out


@dataclass
class ClipFilterResult:
    kept: list[dict]  # the pairs at or above the threshold, in their input order
    skipped: list[dict]  # pairs whose image could not be read: {id, image, reason}
    stats: dict[str, float]  # counts and score quantiles for the phase's metrics line


def select_by_score(scored: pd.DataFrame, threshold: float) -> ClipFilterResult:
    """Split scored pairs (input order kept) into kept ones and unreadable ones; pure, so unit-tested."""
    unreadable = scored[ERROR].notna()
    ok = scored[~unreadable]
    keep = ok[SCORE] >= threshold
    kept = ok[keep].drop(columns=[SCORE, ERROR]).to_dict("records")
    skipped = [
        {"id": r["id"], "image": r["image"], "reason": f"clip_filter: {r[ERROR]}"}
        for r in scored[unreadable].to_dict("records")
    ]
    stats: dict[str, float] = {
        "pairs": len(scored),
        "kept": len(kept),
        "below_threshold": int((~keep).sum()),
        "unreadable": len(skipped),
    }
    if len(ok):
        for q in (0.1, 0.5, 0.9):
            stats[f"score_p{int(q * 100)}"] = round(float(ok[SCORE].quantile(q)), 4)
    return ClipFilterResult(kept, skipped, stats)


def filter_by_clip_score(
    pairs: list[dict], cfg: ClipFilterConfig, max_image_pixels: int = DEFAULT_MAX_PIXELS
) -> ClipFilterResult:
    """Score ``{id, image, caption}`` pairs (absolute image paths) with Ray Data and keep those >= threshold."""
    import pyarrow as pa
    import ray

    from mmdc.data.blocks import dataset_from_table

    if not pairs:
        return ClipFilterResult([], [], {"pairs": 0, "kept": 0, "below_threshold": 0, "unreadable": 0})
    check_open_clip(cfg.model, cfg.model_config)  # fail here, with the install hint, not inside an actor
    frame = pd.DataFrame(pairs)
    frame["_order"] = range(len(frame))
    ds = dataset_from_table(pa.Table.from_pandas(frame, preserve_index=False), 4 * cfg.concurrency).map_batches(
        ClipScorer,
        fn_constructor_kwargs={
            "model": cfg.model,
            "pretrained": cfg.pretrained,
            "model_config": cfg.model_config,
            "max_image_pixels": max_image_pixels,
            "use_gpu": cfg.num_gpus > 0,
        },
        batch_size=cfg.batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
    )
    scored = ds.to_pandas().sort_values("_order").drop(columns="_order").reset_index(drop=True)
    return select_by_score(scored, cfg.threshold)
