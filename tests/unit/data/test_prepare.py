"""D_sin preparation: unfold, skip what cannot be used (with the reason), check images once, cap by id."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from mmdc.data.prepare import prepare_seed_pool


def record(rid: str, image: str, questions=("<image>\nWhat is this?", "And that?")) -> dict:
    turns = []
    for q in questions:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": "An answer."}]
    return {"id": rid, "image": image, "conversations": turns}


def write(tmp_path: Path, data) -> str:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_skips_from_every_step_are_recorded_and_good_rows_kept(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = [record("a", "good.png", ("<image>\nQ?", "  ")), {"id": "bad"}, record("b", "broken.png")]
    pool = prepare_seed_pool(write(tmp_path, data), str(tmp_path), max_instructions=None, max_image_pixels=10**6)
    assert pool.table.column("question").to_pylist() == ["Q?"]
    assert pool.table.column("image").to_pylist() == ["good.png"]  # relative to image_root
    assert [s["stage"] for s in pool.skipped] == ["load", "unfold", "image", "image"]
    assert {s["instruction_id"] for s in pool.skipped if s["stage"] == "image"} and "broken.png" in pool.skipped[-1][
        "image"
    ]
    assert pool.stats == {
        "rows": 1,
        "images": 1,
        "records": 3,
        "images_checked": 2,
        "skipped_images": 1,
        "skipped_rows": 2,
    }


def test_cap_keeps_the_first_rows_by_id_and_everything_skipped_is_an_empty_pool(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    data = [record(f"r{i}", "good.png") for i in range(4)]
    full = prepare_seed_pool(write(tmp_path, data), str(tmp_path), max_instructions=None, max_image_pixels=10**6)
    capped = prepare_seed_pool(write(tmp_path, data), str(tmp_path), max_instructions=3, max_image_pixels=10**6)
    ids = full.table.column("instruction_id").to_pylist()
    assert ids == sorted(ids) and capped.table.column("instruction_id").to_pylist() == ids[:3]
    nothing = prepare_seed_pool(
        write(tmp_path, [record("x", "missing.png")]), str(tmp_path), max_instructions=None, max_image_pixels=10**6
    )
    assert nothing.table.num_rows == 0 and [s["stage"] for s in nothing.skipped] == ["image", "image"]


def test_images_outside_the_folder_are_skipped_and_too_many_bad_images_stop_the_run(tmp_path):
    import pytest

    from mmdc.data.skips import TooMuchBadInput

    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "good.png")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    data = [
        record("a", "good.png"),
        record("b", "../secret.png"),
        record("c", str(tmp_path / "secret.png")),
        record("d", "link.png"),
        record("e", str(root / "good.png")),  # absolute and inside: kept
    ]
    pool = prepare_seed_pool(write(tmp_path, data), str(root), max_instructions=None, max_image_pixels=10**6)
    assert sorted(set(pool.table.column("image").to_pylist())) == sorted(["good.png", str(root / "good.png")])
    reasons = [s["reason"] for s in pool.skipped if s["stage"] == "image"]
    assert len(reasons) == 6 and all("outside the image folder" in r for r in reasons)
    assert pool.stats["images_checked"] == 5 and pool.stats["skipped_images"] == 3
    with pytest.raises(TooMuchBadInput, match=r"3 of 5 images under .*\(60.0%\)"):
        pool.check_skip_ratio(0.05)
    pool.check_skip_ratio(0.6)


def test_a_few_bad_records_are_within_the_ratio_and_a_wrong_file_is_not(tmp_path):
    import pytest

    from mmdc.data.skips import TooMuchBadInput

    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    data = [record(f"r{i}", "good.png") for i in range(19)] + [{"id": "bad"}]
    pool = prepare_seed_pool(write(tmp_path, data), str(tmp_path), max_instructions=None, max_image_pixels=10**6)
    pool.check_skip_ratio(0.05)  # 1 of 20 records: 5%, not more
    with pytest.raises(TooMuchBadInput, match="1 of 20 records"):
        pool.check_skip_ratio(0.04)
