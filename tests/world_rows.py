"""Two world scenes and six assessed rows on them, shared by the tests that grade run outputs against the world
(tests/unit/world/test_outputs.py, tests/unit/eval/test_ablation.py). Importable because pytest puts this folder,
the one of the root conftest.py, on ``sys.path``."""

from __future__ import annotations

import math

from mmdc.world.scenes import Scene, SceneObject

SCENES = [
    Scene("img0", [SceneObject("circle", "red", "small", 10, 10)], "white"),
    Scene("img1", [SceneObject("square", "blue", "large", 40, 40)], "gray"),
]
# (image, question, teacher answer, student answer, difficulty S, hard). Student right: rows 0 and 3; teacher
# right: rows 0 and 1; row 4 is not a world question, row 5 was not scored. The student is wrong on rows 1 (S 0.9)
# and 2 (S 0.5), right on rows 0 (S 0.2) and 3 (S 0.6): AUC = 3 of 4 pairs ranked right = 0.75.
ROWS = [
    ("img0", "Is there a red circle in the image?", "Yes.", "Yes.", 0.2, False),
    ("img0", "What color is the circle?", "Red.", "Blue.", 0.9, True),
    ("img1", "What color is the square?", "Green.", "Red.", 0.5, True),
    ("img1", "Is there a blue square in the image?", "No.", "Yes.", 0.6, True),
    ("img1", "Why is the square there?", "No idea.", "Hm.", 0.7, True),
    ("img0", "What color is the circle?", "Red.", "Red.", math.nan, None),
]
