"""mmdc/world/grading.py: the world's test split as a free-form and a multiple-choice (ScienceQA format) benchmark."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mmdc.eval import harness, scienceqa
from mmdc.world import grading as world_eval
from mmdc.world import scenes as world
from mmdc.world.scenes import QuestionSpec, Scene, SceneObject


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    world.generate_world(root, num_images=0, questions_per_image=3, seed=3, test_images=40)
    return root


def _truth(scenes, item) -> str:
    return world.answer(scenes[item.image_id], world.parse_question(item.question))


def test_load_items_reads_every_test_question_with_its_family(world_dir):
    items, scenes = world_eval.load_items(world_dir)
    assert len(items) == 120 and len({i.sample_id for i in items}) == 120
    first = items[0]
    assert first.sample_id == "test_000000-0" and first.image == "test_000000.png" and "<image>" not in first.prompt
    assert {i.family for i in items} <= set(world.FAMILIES)
    assert all(i.family == world.parse_question(i.question).family for i in items)
    assert set(scenes) == {i.image_id for i in items}


def test_load_items_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="test.json"):
        world_eval.load_items(tmp_path)


def test_evaluate_grades_free_text_per_family(world_dir):
    items, scenes = world_eval.load_items(world_dir)
    outputs = [_truth(scenes, i) for i in items]
    metrics, samples = world_eval.evaluate(items, scenes, outputs)
    assert metrics["Avg"] == 100.0 and metrics["n"] == 120 and metrics["correct"] == 120
    assert list(metrics)[: len(world_eval.COLUMNS)] == list(world_eval.COLUMNS)
    # Wrong on every describe question: Avg and describe drop by exactly those, the rest stay right.
    outputs = ["" if i.family == "describe" else o for i, o in zip(items, outputs)]
    metrics, samples = world_eval.evaluate(items, scenes, outputs)
    n_describe = sum(i.family == "describe" for i in items)
    assert metrics["describe"] == 0.0 and metrics["color"] == 100.0
    assert metrics["Avg"] == round(100 * (120 - n_describe) / 120, 2)
    wrong = next(s for s in samples if s["family"] == "describe")
    assert wrong["output"] == "" and not wrong["correct"] and wrong["answer"].endswith("background.")
    with pytest.raises(ValueError, match="120 items but 1 outputs"):
        world_eval.evaluate(items, scenes, ["x"])


def test_family_metrics_hand_checked():
    samples = [
        {"family": "exist", "correct": True},
        {"family": "exist", "correct": False},
        {"family": "count", "correct": True},
    ]
    out = world_eval.family_metrics(samples)
    assert out == {
        "Avg": 66.67,
        "exist": 50.0,
        "color": None,
        "count": 100.0,
        "spatial": None,
        "compare": None,
        "describe": None,
    }


SCENE = Scene(
    "s", [SceneObject("circle", "red", "large", 10, 10), SceneObject("square", "blue", "small", 40, 40)], "white"
)


@pytest.mark.parametrize(
    "spec, right",
    [
        (QuestionSpec("exist", shape="circle", color="red"), "Yes"),
        (QuestionSpec("exist", shape="triangle", color="red"), "No"),
        (QuestionSpec("color", shape="square"), "blue"),
        (QuestionSpec("count"), "2"),
        (QuestionSpec("count", color="green"), "0"),
        (QuestionSpec("spatial", shape="circle", other="square", relation="above"), "Yes"),
        (QuestionSpec("spatial", shape="circle", other="square", relation="right"), "No"),
        (QuestionSpec("compare", shape="square", other="circle"), "The circle"),
        (QuestionSpec("describe"), "A large red circle and a small blue square on a white background."),
        (QuestionSpec("color", shape="triangle"), "There is no triangle in the image."),  # absent shape
    ],
)
def test_options_hold_exactly_one_right_answer(spec, right):
    options, index = world_eval.options_for(SCENE, spec, random.Random(0))
    assert options[index] == right
    assert len(options) == len(set(options)) and 2 <= len(options) <= len(world_eval.LETTERS)
    assert [world.check_answer(SCENE, spec, o) for o in options].count(True) == 1


def test_multiple_choice_parses_with_the_scienceqa_harness_and_letters_are_right(world_dir, tmp_path):
    items, scenes = world_eval.load_items(world_dir)
    path = world_eval.write_multiple_choice(world_dir, tmp_path / "mc.json", seed=0)
    records = json.loads(path.read_text())
    assert records[0]["conversations"][0]["value"].startswith("<image>\nContext: N/A\n")
    loaded = scienceqa.load(path)  # the real ScienceQA loader: options, answer letter from the gpt turn
    assert [i.sample_id for i in loaded] == [i.sample_id for i in items]
    for record, sqa in zip(records, loaded):
        human = record["conversations"][0]["value"]
        text = dict(line.split(". ", 1) for line in human.splitlines() if line[:3] in {f"{c}. " for c in "ABCDE"})
        scene = scenes[record["id"].rsplit("-", 1)[0]]
        spec = world.parse_question(human.splitlines()[2])
        assert world.check_answer(scene, spec, text[sqa.answer]), record  # the letter names the true option
        assert sqa.image == record["image"] and sqa.prompt.endswith(scienceqa.ANSWER_SUFFIX)
    # Scoring the answer letters through the harness gives 100, a constant wrong letter less.
    metrics, _ = scienceqa.evaluate(loaded, [i.answer for i in loaded])
    assert metrics["Avg"] == 100.0 and metrics["failed"] == 0
    letters = {i.answer for i in loaded}
    assert len(letters) >= 3  # answers are spread over the letters, not always "A"


def test_multiple_choice_is_deterministic_given_the_seed(world_dir, tmp_path):
    a = world_eval.write_multiple_choice(world_dir, tmp_path / "a.json", seed=0).read_bytes()
    b = world_eval.write_multiple_choice(world_dir, tmp_path / "b.json", seed=0).read_bytes()
    c = world_eval.write_multiple_choice(world_dir, tmp_path / "c.json", seed=1).read_bytes()
    assert a == b and a != c


def test_world_mc_task_adds_family_columns(world_dir, tmp_path):
    task = harness.world_mc_task(world_dir, tmp_path / "q.json", seed_value=0, limit=12)
    assert task.benchmark == "world_mc" and len(task.items) == 12
    outputs = [item.answer for item in task.items[:6]] + ["no idea"] * 6
    metrics, samples = task.score(outputs, None)
    assert list(metrics)[: len(world_eval.COLUMNS)] == list(world_eval.COLUMNS)
    assert metrics["Avg"] == 50.0 and metrics["failed"] == 6 and metrics["n"] == 12
    assert all(s["family"] in world.FAMILIES for s in samples)


def test_cli_evaluates_a_world_folder(world_dir, tmp_path):
    from mmdc.eval import cli, report

    class Truthful:
        def __init__(self):
            self.requests = []

        def generate(self, requests):
            self.requests += requests
            return [{"text": "B"} for _ in requests]

    gen = Truthful()
    args = cli.parse_args(
        [
            "--checkpoint",
            "ckpt/iter_1",
            "--benchmark",
            "world_mc",
            "--data",
            str(world_dir),
            "--out",
            str(tmp_path),
            "--limit",
            "10",
            "--role",
            "teacher",
        ]
    )
    payload = cli.run(args, generator=gen)
    assert payload["metrics"]["n"] == 10 and payload["meta"]["role"] == "teacher"
    assert gen.requests[0]["messages"][0]["role"] == "system"  # the teacher's Table 6 prompt
    assert (tmp_path / "questions.json").is_file() and "| Model | Avg | exist |" in (
        tmp_path / report.TABLE_FILE
    ).read_text()
    expected = sum(i.answer == "B" for i in scienceqa.load(tmp_path / "questions.json")[:10]) * 10.0
    assert payload["metrics"]["Avg"] == expected
