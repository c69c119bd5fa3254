"""Where a run's inputs are: configured files as they are, or the world generated into the run directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mmdc.config import load_config
from mmdc.world.sources import Sources, resolve_data


def test_llava_sources_are_the_configured_files_and_captions_default_to_the_image_folder():
    cfg = load_config(
        None,
        ["data.source=llava", "data.instructions=/d/i.json", "data.image_folder=/d/coco", "data.captions=/d/c.json"],
    )
    sources = resolve_data(cfg.data, Path("/unused"))
    assert (sources.instructions, sources.image_root, sources.captions) == ("/d/i.json", "/d/coco", "/d/c.json")
    assert sources.caption_root == "/d/coco"
    own = resolve_data(
        load_config(
            None, ["data.source=llava", "data.instructions=/d/i.json", "data.caption_image_folder=/d/pretrain"]
        ).data,
        Path("/unused"),
    )
    assert own.caption_root == "/d/pretrain"


def test_world_sources_are_generated_and_survive_a_round_trip_through_state(tmp_path):
    cfg = load_config(None, ["data.world.num_images=3", "data.world.test_images=1"])
    sources = resolve_data(cfg.data, tmp_path / "world")
    assert Path(sources.instructions).exists() and Path(sources.captions).exists()
    assert sources.caption_root == sources.image_root
    assert Sources(**dataclasses.asdict(sources)) == sources  # state.json keeps them as a dict
    assert Sources(**{"image_root": "/old", "captions": "/old/c.json"}).caption_root == "/old"  # an older run's state
