"""A LLaVA-format run whose instructions and captions hold every kind of bad input we know of (issue 29).

It must finish with every good row in the pools (and every good caption pair in stage 1) and every bad one in
``skipped.jsonl`` with its reason; while it runs, a second ``mmdc.run`` on its directory is refused at once,
naming the holder. The kinds are the table in README "Reliability".
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from mmdc.data.blocks import find_problems
from mmdc.data.images import image_problem
from mmdc.run import main

pytestmark = pytest.mark.integration

COLOURS = [(230, 20, 20), (20, 200, 40), (30, 40, 220), (240, 220, 30), (200, 30, 200), (20, 200, 200), (90, 90, 90)]


def turns(*questions: str) -> list[dict]:
    out = []
    for q in questions:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": "An answer."}]
    return out


def record(rid: str, image: str, *questions: str) -> dict:
    return {"id": rid, "image": image, "conversations": turns(*(questions or ("<image>\nWhat colour is it?",)))}


def write_images(images: Path, outside: Path) -> None:
    images.mkdir()
    outside.mkdir()
    for k, colour in enumerate(COLOURS):
        Image.new("RGB", (32, 32), colour).save(images / f"img{k}.png")
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(png, format="PNG")
    (images / "corrupt.png").write_bytes(b"\x89PNG not really")
    (images / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (images / "zero.png").write_bytes(b"")
    Image.new("RGB", (400, 400)).save(images / "huge.png")  # 160,000 pixels > data.max_image_pixels below
    (images / "folder.png").mkdir()
    Image.new("RGB", (32, 32)).save(outside / "secret.png")
    (images / "link.png").symlink_to(outside / "secret.png")


def instructions_file(path: Path, images: Path, outside: Path) -> list[tuple[str, int]]:
    """The instruction file (JSON Lines, with a BOM); returns the (source id, turn) of every good row."""
    good = [
        (record("g0", "img0.png", "<image>\nWhat colour is it?", "Is it bright?"), [0, 1]),
        (record("g1", "img1.png", "<image>\nWhat\u2028colour is it?"), [0]),  # U+2028: one line, one record
        (record("g2", "img2.png", "<image>\nWhat colour is it?", "   "), [0]),  # its empty turn 1 is skipped
        (record("g3", "img3.png"), [0]),
        (record("g4", "img4.png", "Which colour?\n<image>"), [0]),
        (record("g5", "img5.png", "<image>\nWhat colour?", "Why?"), [0, 1]),
        (record("g6", str(images / "img6.png")), [0]),  # absolute, inside the folder: allowed
    ]
    bad_images = ["../outside/secret.png", str(outside / "secret.png"), "link.png", "corrupt.png", "truncated.png"]
    bad_images += ["zero.png", "missing.png", "huge.png", "folder.png", "nul\x00.png"]
    lines = [json.dumps(rec, ensure_ascii=False).encode() for rec, _ in good]
    lines.insert(2, b'{"id": "latin1", "image": "img0.png", "conversations": [{"from": "human", "value": "caf\xe9"}]}')
    lines.insert(3, b'{"id": "broken", "image": ')
    lines.insert(4, json.dumps(record("no-image-token", "img0.png", "What colour?")).encode())
    lines.insert(5, json.dumps(record("surrogate", "img0.png", "<image>\nbad \udc80 text")).encode())
    lines.insert(6, json.dumps(good[0][0]).encode())  # an exact duplicate of g0: both turns skipped
    lines += [json.dumps(record(f"bad{k}", image)).encode() for k, image in enumerate(bad_images)]
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    return [(rec["id"], turn) for rec, kept in good for turn in kept]


def captions_file(path: Path, pretrain: Path) -> int:
    """LLaVA-Pretrain-format caption pairs (one JSON list) over ``pretrain``; returns how many are good."""
    pretrain.mkdir()
    for k, colour in enumerate(COLOURS):
        Image.new("RGB", (32, 32), colour).save(pretrain / f"p{k}.png")
    (pretrain / "corrupt.png").write_bytes(b"GIF89a nothing")

    def pair(pid: str, image: str, caption: str = "a square of one colour") -> dict:
        return {
            "id": pid,
            "image": image,
            "conversations": [*turns("<image>\nDescribe.")[:1], {"from": "gpt", "value": caption}],
        }

    good = [pair(f"c{k}", f"p{k % len(COLOURS)}.png", f"colour square number {k}") for k in range(15)]
    good.append(pair("sep", "p0.png", "one line\u2028two parts"))
    records = [json.dumps(p, ensure_ascii=False).encode() for p in good]
    records += [
        json.dumps({"id": "no-image", "conversations": turns("x")}).encode(),
        json.dumps(pair("empty-caption", "p1.png", " ")).encode(),
        b'"just a string"',
        json.dumps(pair("latin1", "p1.png", "CAPTION")).encode().replace(b"CAPTION", b"caf\xe9"),
        json.dumps(pair("corrupt", "corrupt.png")).encode(),
        json.dumps(pair("missing", "p99.png")).encode(),
        json.dumps(pair("escape", "../images/img0.png")).encode(),  # a real image, but outside caption folder
    ]
    path.write_bytes(b"[" + b",\n".join(records) + b"]")
    return len(good)


def skips(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "skipped.jsonl").read_text().splitlines()]


def test_every_bad_input_is_skipped_every_good_row_kept_and_a_live_directory_refused(
    ray_cluster, tiny_run_args, tmp_path
):
    images, outside, pretrain = tmp_path / "images", tmp_path / "outside", tmp_path / "pretrain"
    write_images(images, outside)
    good_rows = instructions_file(tmp_path / "instructions.jsonl", images, outside)
    good_pairs = captions_file(tmp_path / "captions.json", pretrain)
    run_dir = tmp_path / "run"
    args = tiny_run_args(run_dir) + [
        item
        for setting in (
            "models.teacher=tiny:random-teacher",  # what the teacher says does not matter here
            "data.source=llava",
            f"data.instructions={tmp_path / 'instructions.jsonl'}",
            f"data.image_folder={images}",
            f"data.captions={tmp_path / 'captions.json'}",
            f"data.caption_image_folder={pretrain}",
            "data.caption_filter.enabled=false",  # every good pair reaches stage 1
            "data.max_image_pixels=100000",
            "data.max_skip_ratio=0.7",  # this file is mostly bad on purpose
            "eval.enabled=false",
        )
        for item in ("--set", setting)
    ]

    # The parallel image check itself, in tasks of two images (the run below checks in one task: it has few).
    names = [f"img{k}.png" for k in range(len(COLOURS))] + ["corrupt.png", "../outside/secret.png", "missing.png"]
    check = partial(image_problem, image_root=str(images), max_pixels=100_000)
    found = find_problems(names, check, parallel=True, values_per_task=2)
    assert found == find_problems(names, check, parallel=False) and len(found) == 3

    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", main(args)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (run_dir / "state.json").exists():  # the driver has started its first phase
        assert thread.is_alive() and time.monotonic() < deadline, f"the run ended early (rc={result.get('rc')})"
        time.sleep(0.2)
    second = subprocess.run(
        [sys.executable, "-m", "mmdc.run", "--resume", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert second.returncode == 2, second.stderr
    assert "in use by a live run" in second.stderr and f"pid {os.getpid()}" in second.stderr, second.stderr
    thread.join(timeout=1200)
    assert result.get("rc") == 0
    assert not (run_dir / "run.lock").exists()  # released at the end

    pool = pd.read_parquet(run_dir / "pools/iter_0/tuning.parquet")
    assert sorted(zip(pool["source_id"], pool["turn"])) == sorted(good_rows)
    assert "What\u2028colour is it?" in set(pool["question"])

    skipped = skips(run_dir)
    load = [s for s in skipped if s["stage"] == "load"]
    assert [s["line"] for s in load] == [3, 4, 5, 6] and {s["path"] for s in load} == {
        str(tmp_path / "instructions.jsonl")
    }
    assert "line 3 is not UTF-8" in load[0]["reason"] and "line 4 is not JSON" in load[1]["reason"]
    assert "no <image>" in load[2]["reason"] and "lone surrogate" in load[3]["reason"]
    unfold = [s for s in skipped if s["stage"] == "unfold"]
    assert sorted((s["id"], s["turn"]) for s in unfold) == [("g0", 0), ("g0", 1), ("g2", 1)]
    image_reasons = {s["image"]: s["reason"] for s in skipped if s["stage"] == "image"}
    assert len(image_reasons) == 10
    for image, fragment in {
        "../outside/secret.png": "outside the image folder",
        str(outside / "secret.png"): "outside the image folder",
        "link.png": "a symlink in it points to",
        "corrupt.png": "corrupt",
        "truncated.png": "truncated",
        "zero.png": "zero-byte",
        "missing.png": "missing",
        "huge.png": "too large",
        "folder.png": "not a regular file",
        "nul\x00.png": "not a usable path",
    }.items():
        assert fragment in image_reasons[image], (image, image_reasons[image])

    captions = [s for s in skipped if s["stage"] in ("captions", "caption_image")]
    assert sorted(s["index"] for s in captions if s["stage"] == "captions") == [16, 17, 18, 19]
    assert sorted(s["id"] for s in captions if s["stage"] == "caption_image") == ["corrupt", "escape", "missing"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    align = next(r for r in records if r.get("phase") == "align")
    assert (align["pairs"], align["skipped_records"], align["skipped_images"]) == (good_pairs + 7, 4, 3)
    assert align["rows"] == good_pairs and align["images_checked"] == len(COLOURS) + 3
    prepare = next(r for r in records if r.get("phase") == "prepare")
    assert prepare["rows"] == len(good_rows) and prepare["skipped_images"] == 10
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "finished"
    assert "prepare done" in (run_dir / "driver.log").read_text()
