"""The CLIP-score filter in a real run: Ray Data scoring actors, then stage 1 on what they kept.

Runs only where open_clip imports (the ``.venv-clip`` environment; ``pytest -m clip``).
"""

import json
from pathlib import Path

import pytest

pytest.importorskip("open_clip")

pytestmark = [pytest.mark.integration, pytest.mark.clip]
TINY = Path(__file__).resolve().parents[1] / "assets" / "mmdc-tiny-clip.json"


def test_stage1_trains_on_the_pairs_the_clip_filter_kept(ray_cluster, tmp_path):
    from mmdc.run import main

    run_dir = tmp_path / "clip-run"
    overrides = [
        "run.iterations=0",
        "models.teacher=tiny:teacher-short",
        "data.world.num_images=16",
        "data.world.test_images=2",
        "eval.enabled=false",
        "align.epochs=1",
        "data.clip_filter.enabled=true",
        f"data.clip_filter.model={TINY.stem}",
        f"data.clip_filter.model_config={TINY}",
        "data.clip_filter.pretrained=null",
        "data.clip_filter.threshold=-1",
        "data.clip_filter.batch_size=8",
        "data.caption_filter.enabled=false",
    ]
    args = ["--output", str(run_dir)]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    align = next(r for r in records if r.get("phase") == "align")
    captions = json.loads(Path(json.loads((run_dir / "state.json").read_text())["data"]["captions"]).read_text())
    assert align["clip_pairs"] == len(captions)
    assert align["clip_kept"] == align["rows"] == len(captions)  # threshold -1 keeps every readable pair
    assert align["clip_unreadable"] == 0
    assert -1 <= align["clip_score_p10"] <= align["clip_score_p90"] <= 1
    assert (run_dir / "checkpoints" / "align" / "config.json").exists()
