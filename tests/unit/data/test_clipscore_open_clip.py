"""The CLIP-score filter on a real open_clip model (a tiny config with random weights).

Needs open_clip_torch and torchvision, which cannot sit beside this project's CPU torch: the suite
skips these tests there, and ``scripts/test.sh`` runs them in a second environment (``.venv-clip``,
``scripts/setup_clip.sh``) with ``pytest -m clip``.
"""

import math
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

from mmdc.data.clipscore import ClipScorer, load_open_clip  # noqa: E402

pytestmark = pytest.mark.clip
TINY = Path(__file__).resolve().parents[2] / "assets" / "mmdc-tiny-clip.json"
MODEL = TINY.stem


@pytest.fixture
def batch(tmp_path):
    paths = []
    for i, color in enumerate(["red", "blue", "green"]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (64, 64), color).save(p)
        paths.append(str(p))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths.insert(1, str(tmp_path / "broken.png"))
    return pd.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "image": paths,
            "caption": ["a red square", "broken", "a blue square", "a green square"],
        }
    )


def test_scores_are_cosines_and_a_broken_image_is_an_error_not_a_score(batch):
    torch.manual_seed(0)
    out = ClipScorer(MODEL, None, str(TINY))(batch)
    assert list(out["id"]) == ["a", "b", "c", "d"]  # order and rows kept
    assert math.isnan(out["clip_score"][1]) and "broken.png" in out["clip_error"][1]
    for i in (0, 2, 3):
        assert -1.0 <= out["clip_score"][i] <= 1.0 and pd.isna(out["clip_error"][i])


def test_a_local_checkpoint_file_loads_as_pretrained(batch, tmp_path):
    torch.manual_seed(1)
    model, _, _ = load_open_clip(MODEL, None, str(TINY))
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    first = ClipScorer(MODEL, str(weights), str(TINY))(batch)["clip_score"]
    torch.manual_seed(2)  # another random init: only the file's weights can make the scores equal
    second = ClipScorer(MODEL, str(weights), str(TINY))(batch)["clip_score"]
    assert first.equals(second)
    torch.manual_seed(3)
    random = ClipScorer(MODEL, None, str(TINY))(batch)["clip_score"]
    assert not first.equals(random)


def test_an_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="not an open_clip model"):
        load_open_clip("no-such-model", None)
