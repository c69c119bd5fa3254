"""Benchmarks on the synthetic world's held-out test split: free-form ("world") and multiple choice ("world_mc").

Why two renderings of the same questions:

- **world** asks each test question as it is and grades the free-text reply
  with the world's exact checker (``world.grade``): accuracy per question
  family and overall. This is what the student is trained to do, so it is the
  number that shows calibration working (issue 9, Figure 4 on the world).
- **world_mc** asks the same questions with lettered options in LLaVA's
  converted ScienceQA format (``{id, image, conversations}``, the gpt turn is
  the answer letter), so ``mmdc.eval.scienceqa`` scores it exactly as it scores
  ScienceQA: the world doubles as a fixture for the real harness, and a
  student's multiple-choice skill can be watched on data we fully control.

Both are pure functions of the world files (``test.json``, ``scenes.jsonl``)
and a seed: options and their order come from a per-question random stream
seeded by (seed, question id), so one world and one seed give identical files.

    items, scenes = load_items(world_dir)
    metrics, samples = evaluate(items, scenes, replies)                 # world
    records = multiple_choice_records(items, scenes, seed=0)            # world_mc, LLaVA ScienceQA format
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdc.world.scenes import (
    COLORS,
    FAMILIES,
    SHAPES,
    QuestionSpec,
    Scene,
    SceneObject,
    answer,
    check_answer,
    describe,
    grade,
    load_scenes,
    parse_question,
)

FREE_FORM = "world"
MULTIPLE_CHOICE = "world_mc"
OVERALL = "Avg"
COLUMNS = (OVERALL, *FAMILIES)  # table order: overall first, then families from easy to hard
LETTERS = "ABCDE"  # ScienceQA's (and so LLaVA's parser's) options
NUM_OPTIONS = 4  # options for colour and description questions (yes/no, count and compare have their own)
MAX_OBJECTS = 3  # world.random_scene draws 1-3 objects: counts are 0..3


@dataclass(frozen=True)
class WorldItem:
    """One held-out test question."""

    sample_id: str  # "<image_id>-<k>": the k-th question of that image in test.json
    image: str  # file name inside the world's images folder
    image_id: str
    question: str  # the question text, <image> removed
    family: str  # the question family recorded by the generator

    @property
    def prompt(self) -> str:
        """What the model is asked (harness protocol: every item has ``prompt`` and ``image``)."""
        return self.question


def load_items(world_dir: str | Path) -> tuple[list[WorldItem], dict[str, Scene]]:
    """Test questions in file order and the scenes they are about, from a ``generate_world`` folder."""
    root = Path(world_dir)
    test, scenes_file = root / "test.json", root / "scenes.jsonl"
    for path in (test, scenes_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: world file not found (is {root} a generate_world folder?)")
    scenes = load_scenes(scenes_file)
    items = []
    for record in json.loads(test.read_text(encoding="utf-8")):
        image_id = str(record["id"])
        if image_id not in scenes:
            raise KeyError(f"{test}: image {image_id!r} has no scene in {scenes_file}")
        humans = [t for t in record["conversations"] if t.get("from") == "human"]
        for k, turn in enumerate(humans):
            question = turn["value"].replace("<image>", "").strip()
            family = turn.get("family") or _family(question)
            items.append(WorldItem(f"{image_id}-{k}", record["image"], image_id, question, family))
    return items, scenes


def _family(question: str) -> str:
    spec = parse_question(question)
    if spec is None:
        raise ValueError(f"test question the world cannot parse: {question!r}")
    return spec.family


def _percent(flags: Sequence[bool]) -> float | None:
    """Accuracy in percent with two decimals (the paper's tables); None for an empty family."""
    return round(100.0 * sum(flags) / len(flags), 2) if flags else None


def family_metrics(samples: Sequence[dict]) -> dict[str, float | None]:
    """``Avg`` and one accuracy per family (``COLUMNS`` order) from samples with ``correct`` and ``family``."""
    out: dict[str, float | None] = {OVERALL: _percent([s["correct"] for s in samples])}
    for family in FAMILIES:
        out[family] = _percent([s["correct"] for s in samples if s["family"] == family])
    return out


def evaluate(items: Sequence[WorldItem], scenes: dict[str, Scene], outputs: Sequence[str]) -> tuple[dict, list[dict]]:
    """Grade free-text replies (one per item, same order) with the world's checker: (metrics, per-sample records).

    metrics: ``COLUMNS`` plus ``n`` and ``correct``. A sample records the
    canonical answer beside the reply, so a reader sees at once why it is wrong.
    """
    if len(items) != len(outputs):
        raise ValueError(f"{len(items)} items but {len(outputs)} outputs")
    samples = []
    for item, output in zip(items, outputs):
        scene = scenes[item.image_id]
        verdict = grade(scene, item.question, output)
        if verdict is None:
            raise ValueError(f"{item.sample_id}: the world cannot parse its own test question {item.question!r}")
        samples.append(
            {
                "id": item.sample_id,
                "prompt": item.prompt,
                "image": item.image,
                "family": item.family,
                "output": output,
                "answer": answer(scene, parse_question(item.question)),
                "correct": verdict,
            }
        )
    result: dict[str, Any] = dict(family_metrics(samples))
    result.update(n=len(samples), correct=sum(s["correct"] for s in samples))
    return result, samples


# ----------------------------------------------------------------------------- multiple choice


def _absent_shape(scene: Scene, spec: QuestionSpec) -> str | None:
    """A shape the question presupposes but the scene lacks (the generator never asks these; augmentation may)."""
    if spec.family in ("color", "spatial", "compare"):
        return next((s for s in (spec.shape, spec.other) if s is not None and scene.find(s) is None), None)
    return None


def _description_distractors(scene: Scene) -> list[str]:
    """Descriptions of scenes one edit away (a colour, a size, a shape, an object more or less): all false."""
    objs = list(scene.objects)
    variants: list[list[SceneObject]] = []
    for i, obj in enumerate(objs):
        for color in COLORS:
            if color != obj.color:
                variants.append(objs[:i] + [SceneObject(obj.shape, color, obj.size, obj.x, obj.y)] + objs[i + 1 :])
        flipped = "small" if obj.size == "large" else "large"
        variants.append(objs[:i] + [SceneObject(obj.shape, obj.color, flipped, obj.x, obj.y)] + objs[i + 1 :])
        for shape in SHAPES:
            if scene.find(shape) is None:
                variants.append(objs[:i] + [SceneObject(shape, obj.color, obj.size, obj.x, obj.y)] + objs[i + 1 :])
        if len(objs) > 1:
            variants.append(objs[:i] + objs[i + 1 :])
    truth = describe(scene)
    texts = [describe(Scene(scene.image_id, v, scene.background, scene.image_size)) for v in variants]
    return [t for t in dict.fromkeys(texts) if t != truth]


def options_for(scene: Scene, spec: QuestionSpec, rng: random.Random) -> tuple[list[str], int]:
    """(options in display order, index of the correct one) for one question; shuffled by ``rng``.

    Exactly one option is right by the world's own checker (``check_answer``);
    a question whose options break that is a bug here and raises.
    """
    absent = _absent_shape(scene, spec)
    if absent is not None:
        wrong = {
            "color": rng.sample(sorted(COLORS), 3),
            "spatial": ["Yes", "No"],
            "compare": [f"The {spec.shape}", f"The {spec.other}", "They are the same size"],
        }[spec.family]
        correct, distractors = f"There is no {absent} in the image.", wrong
    elif spec.family in ("exist", "spatial"):
        correct = "Yes" if check_answer(scene, spec, "Yes") else "No"
        distractors = ["No" if correct == "Yes" else "Yes"]
    elif spec.family == "color":
        correct = scene.find(spec.shape).color
        distractors = rng.sample(sorted(c for c in COLORS if c != correct), NUM_OPTIONS - 1)
    elif spec.family == "count":
        numbers = [str(n) for n in range(MAX_OBJECTS + 1)]
        correct = next(n for n in numbers if check_answer(scene, spec, n))
        distractors = [n for n in numbers if n != correct]
    elif spec.family == "compare":
        choices = [f"The {spec.shape}", f"The {spec.other}", "They are the same size"]
        correct = next(c for c in choices if check_answer(scene, spec, c))
        distractors = [c for c in choices if c != correct]
    elif spec.family == "describe":
        correct = describe(scene)
        distractors = rng.sample(_description_distractors(scene), NUM_OPTIONS - 1)
    else:
        raise ValueError(f"unknown question family {spec.family!r}")
    options = [correct, *distractors]
    rng.shuffle(options)
    right = [i for i, text in enumerate(options) if check_answer(scene, spec, text)]
    if right != [options.index(correct)]:
        raise AssertionError(f"{scene.image_id}: options {options} for {spec} are not exactly one right answer")
    return options, right[0]


def multiple_choice_records(items: Sequence[WorldItem], scenes: dict[str, Scene], seed: int) -> list[dict]:
    """The questions in LLaVA's converted ScienceQA format (``llava_test_CQM-A.json``), plus each one's ``family``.

    ``mmdc.eval.scienceqa.load`` reads the result as it reads ScienceQA: the
    first human turn is ``<image>``, ``Context: N/A``, the question and the
    ``"A. ..."`` lines; the gpt turn is the answer letter.
    """
    records = []
    for item in items:
        scene = scenes[item.image_id]
        spec = parse_question(item.question)
        if spec is None:
            raise ValueError(f"{item.sample_id}: the world cannot parse its own test question {item.question!r}")
        rng = random.Random(f"mmdc-world-mc:{seed}:{item.sample_id}")
        options, index = options_for(scene, spec, rng)
        lines = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))
        records.append(
            {
                "id": item.sample_id,
                "image": item.image,
                "conversations": [
                    {"from": "human", "value": f"<image>\nContext: N/A\n{item.question}\n{lines}"},
                    {"from": "gpt", "value": LETTERS[index]},
                ],
                "family": item.family,
            }
        )
    return records


def write_multiple_choice(world_dir: str | Path, out_file: str | Path, seed: int) -> Path:
    """Write ``multiple_choice_records`` of a world's test split as JSON; returns the file."""
    items, scenes = load_items(world_dir)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(multiple_choice_records(items, scenes, seed), indent=1) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


__all__ = [
    "COLUMNS",
    "FREE_FORM",
    "MULTIPLE_CHOICE",
    "OVERALL",
    "WorldItem",
    "evaluate",
    "family_metrics",
    "load_items",
    "multiple_choice_records",
    "options_for",
    "write_multiple_choice",
]
