"""Stage 1's caption pairs: malformed records and unusable images are recorded skips, counted, and weighed."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mmdc.config import DataConfig
from mmdc.data.captions import stage1_pairs
from mmdc.data.skips import TooMuchBadInput


def pretrain(rid: str, image: str, caption: str = "a red circle") -> dict:
    return {
        "id": rid,
        "image": image,
        "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caption}],
    }


def data(**changes) -> DataConfig:
    config = DataConfig(**changes)
    config.caption_filter.enabled = False
    return config


def test_bad_records_and_images_are_skipped_and_every_good_pair_kept(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8), "red").save(images / name)
    (images / "corrupt.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    records = [
        pretrain("a", "a.png"),
        {"id": "no-image", "caption": "x"},
        pretrain("b", "b.png"),
        pretrain("corrupt", "corrupt.png"),
        pretrain("missing", "missing.png"),
        pretrain("escape", "../outside.png"),
        pretrain("no-caption", "a.png", caption="  "),
        "not an object",
        pretrain("c", str(images / "c.png")),  # absolute and inside: kept
    ]
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps(records))
    pairs = stage1_pairs(str(captions), str(images), data(), seed=0)
    assert [row["id"] for row in pairs.rows] == ["a", "b", "c"]
    assert pairs.rows[0]["image"] == str(images / "a.png") and pairs.rows[0]["caption"] == "a red circle"
    by_id = {skip.get("id"): skip for skip in pairs.skipped}
    assert [s["stage"] for s in pairs.skipped] == ["captions"] * 3 + ["caption_image"] * 3
    assert by_id["no-image"]["index"] == 1 and by_id["no-image"]["path"] == str(captions)
    assert "no caption" in by_id["no-caption"]["reason"]
    assert "corrupt" in by_id["corrupt"]["reason"] and "missing" in by_id["missing"]["reason"]
    assert "outside the image folder" in by_id["escape"]["reason"]
    assert pairs.stats == {"pairs": 9, "skipped_records": 3, "images_checked": 6, "skipped_images": 3}
    with pytest.raises(TooMuchBadInput, match=r"3 of 9 records of .*captions.json \(33.3%\)"):
        pairs.check_skip_ratio(0.05)
    pairs.check_skip_ratio(0.5)  # 3 of 9 records, 3 of 6 pairs' images: within


def test_a_wrong_image_folder_stops_the_run_instead_of_skipping_every_pair(tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        "".join(json.dumps({"id": str(i), "image": f"{i}.png", "caption": "c"}) + "\n" for i in range(4))
    )
    pairs = stage1_pairs(str(captions), str(tmp_path / "wrong"), data(), seed=0)
    assert pairs.rows == [] and len(pairs.skipped) == 4
    with pytest.raises(TooMuchBadInput) as err:
        pairs.check_skip_ratio(0.05)
    assert "4 of 4 caption pairs' images under" in str(err.value) and "missing" in str(err.value)
    assert "data.max_skip_ratio=0.05" in str(err.value)


def test_caption_lines_that_are_not_utf8_are_skipped_by_line(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    captions = tmp_path / "captions.jsonl"
    good = json.dumps({"id": "a", "image": "a.png", "caption": "une voiture\u2028rouge"}, ensure_ascii=False)
    captions.write_bytes(good.encode() + b'\n{"id": "b", "image": "a.png", "caption": "caf\xe9"}\n')
    pairs = stage1_pairs(str(captions), str(images), data(), seed=0)
    assert [row["caption"] for row in pairs.rows] == ["une voiture\u2028rouge"]
    assert pairs.skipped[0]["line"] == 2 and "line 2 is not UTF-8" in pairs.skipped[0]["reason"]
