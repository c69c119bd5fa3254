"""The CLIP-score filter's pure parts: selection by threshold, unreadable images, a missing open_clip, config checks."""

import math
import sys

import pandas as pd
import pytest

from mmdc.config import ConfigError, load_config
from mmdc.data.clipscore import ERROR, SCORE, ClipFilterUnavailable, check_open_clip, select_by_score


def _scored(scores, errors=None):
    n = len(scores)
    return pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(n)],
            "image": [f"/img/{i}.png" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            SCORE: scores,
            ERROR: errors or [None] * n,
        }
    )


def test_keeps_pairs_at_or_above_the_threshold_in_input_order():
    result = select_by_score(_scored([0.31, 0.1, 0.28, 0.279999, 0.5]), threshold=0.28)
    assert [r["id"] for r in result.kept] == ["p0", "p2", "p4"]
    assert set(result.kept[0]) == {"id", "image", "caption"}  # the score columns do not leak into training rows
    assert result.stats["kept"] == 3 and result.stats["below_threshold"] == 2 and result.stats["unreadable"] == 0
    assert result.stats["score_p50"] == 0.28


def test_an_unreadable_image_is_a_skip_with_its_reason_and_moves_nothing_else():
    result = select_by_score(_scored([0.4, math.nan, 0.4], [None, "/img/1.png: truncated image", None]), 0.3)
    assert [r["id"] for r in result.kept] == ["p0", "p2"]
    assert result.skipped == [{"id": "p1", "image": "/img/1.png", "reason": "clip_filter: /img/1.png: truncated image"}]
    assert result.stats == {
        "pairs": 3,
        "kept": 2,
        "below_threshold": 0,
        "unreadable": 1,
        "score_p10": 0.4,
        "score_p50": 0.4,
        "score_p90": 0.4,
    }


def test_all_unreadable_has_no_quantiles():
    result = select_by_score(_scored([math.nan], ["bad"]), 0.3)
    assert result.kept == [] and result.stats["unreadable"] == 1 and "score_p50" not in result.stats


def test_a_missing_open_clip_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError, in any environment
    with pytest.raises(ClipFilterUnavailable, match=r'pip install "mmdc\[clip\]"'):
        check_open_clip("ViT-B-32")


@pytest.mark.parametrize(
    "key,value", [("threshold", "1.5"), ("batch_size", "0"), ("concurrency", "0"), ("num_gpus", "-1")]
)
def test_bad_clip_filter_settings_are_refused_naming_the_section(key, value):
    with pytest.raises(ConfigError, match="data.clip_filter"):
        load_config(None, [f"data.clip_filter.{key}={value}"])


def test_off_by_default():
    assert not load_config(None, []).data.clip_filter.enabled
