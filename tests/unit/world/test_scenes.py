"""The synthetic world: parser round trip, truthful answers, answer checking, deterministic files."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from PIL import Image
from rouge_score import rouge_scorer

from mmdc.data.llava import load_llava_records
from mmdc.world.scenes import (
    COLORS,
    FAMILIES,
    TEMPLATES,
    QuestionSpec,
    Scene,
    SceneObject,
    all_specs,
    answer,
    check_answer,
    describe,
    families_for,
    generate_world,
    grade,
    load_scenes,
    parse_question,
    random_question,
    random_scene,
    render,
    render_question,
    templates_for,
    world_corpus,
)

# Hand-built: large red circle on the left and high, small blue square on the right and low,
# small red triangle in the middle. Image y grows downwards.
SCENE = Scene(
    image_id="hand",
    objects=[
        SceneObject("circle", "red", "large", 15, 15),
        SceneObject("square", "blue", "small", 50, 50),
        SceneObject("triangle", "red", "small", 32, 30),
    ],
    background="white",
)


def test_every_template_of_every_family_parses_back_to_its_spec():
    for family in FAMILIES:
        assert len(TEMPLATES[family]) >= 3
        for spec in all_specs(family):
            fitting = templates_for(spec)
            assert len(fitting) >= 3, spec
            for index in range(len(fitting)):
                text = render_question(spec, index)
                assert parse_question(text) == spec, text


def test_parser_is_lenient_about_form_not_words():
    spec = QuestionSpec("spatial", shape="circle", other="square", relation="left")
    assert parse_question("<image>\n  IS the circle to the LEFT of the square ?") == spec
    assert parse_question("Take the square as reference is the circle to the left of it") == spec
    assert parse_question("What colour is the triangle?") == QuestionSpec("color", shape="triangle")
    assert parse_question("Is the circle to the left of the circle?") is None
    assert parse_question("What is the capital of France?") is None
    assert parse_question("Is there a pink circle in the image?") is None  # not a world colour
    assert parse_question("") is None


def test_paraphrases_of_one_family_are_rouge_distinct():
    # The augmentor accepts a new question only if ROUGE-L < 0.7 against the image's other questions.
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for family in FAMILIES:
        for spec in all_specs(family):
            texts = [render_question(spec, i) for i in range(len(templates_for(spec)))]
            for i, a in enumerate(texts):
                for b in texts[i + 1 :]:
                    assert scorer.score(a, b)["rougeL"].fmeasure < 0.7, (a, b)


def test_scene_relations_by_hand():
    assert SCENE.holds("circle", "left", "square") and SCENE.holds("circle", "above", "square")
    assert not SCENE.holds("square", "above", "triangle")
    assert ("triangle", "below", "circle") in SCENE.relations()
    assert describe(SCENE).startswith("A large red circle, a small red triangle")  # objects left to right
    assert families_for(Scene("one", [SceneObject("circle", "red", "small", 30, 30)], "gray")) == [
        "exist",
        "color",
        "count",
        "describe",
    ]


@pytest.mark.parametrize(
    "spec, expected",
    [
        (QuestionSpec("exist", shape="circle", color="red"), "Yes."),
        (QuestionSpec("exist", shape="circle", color="blue"), "No."),
        (QuestionSpec("color", shape="square"), "The square is blue."),
        (QuestionSpec("count"), "There are 3 shapes."),
        (QuestionSpec("count", color="red"), "There are 2 red shapes."),
        (QuestionSpec("count", color="blue"), "There is 1 blue shape."),
        (QuestionSpec("count", color="green"), "There are no green shapes."),
        (
            QuestionSpec("spatial", shape="circle", other="square", relation="left"),
            "Yes, the circle is to the left of the square.",
        ),
        (
            QuestionSpec("spatial", shape="square", other="triangle", relation="above"),
            "No, the square is below the triangle.",
        ),
        (QuestionSpec("compare", shape="square", other="circle"), "The circle is larger than the square."),
        (QuestionSpec("compare", shape="square", other="triangle"), "The square and the triangle are the same size."),
        (
            QuestionSpec("describe"),
            "A large red circle, a small red triangle and a small blue square on a white background.",
        ),
    ],
)
def test_canonical_answers_by_hand(spec, expected):
    assert answer(SCENE, spec) == expected
    assert check_answer(SCENE, spec, expected)


@pytest.mark.parametrize(
    "spec, right, wrong",
    [
        (QuestionSpec("exist", shape="circle", color="red"), ["yes", "YES, there is one!"], ["No.", "There is.", ""]),
        (
            QuestionSpec("color", shape="square"),
            ["blue", "It's BLUE."],
            ["red", "It is blue and red.", "I don't know."],
        ),
        (QuestionSpec("count"), ["3", "three shapes", "No, there are 3."], ["There are 2 shapes.", "many"]),
        (QuestionSpec("count", color="green"), ["none", "There are no green shapes.", "0"], ["One.", "yes"]),
        (
            QuestionSpec("spatial", shape="circle", other="square", relation="right"),
            ["No.", "no, it is to the left"],
            ["Yes, the circle is to the right of the square."],
        ),
        (
            QuestionSpec("compare", shape="square", other="circle"),
            ["The circle.", "the square is smaller than the circle", "The circle is the bigger one."],
            ["The square is larger than the circle.", "They are the same size.", "the circle is smaller"],
        ),
        (
            QuestionSpec("compare", shape="square", other="triangle"),
            ["They are equally big.", "same size"],
            ["The square is larger than the triangle."],
        ),
        (
            QuestionSpec("describe"),
            ["A red circle, a red triangle and a blue square.", "blue square, large red circle, small red triangle"],
            [
                "A red circle and a blue square.",
                "A small red circle, a red triangle and a blue square.",
                "A red circle, a red triangle, a blue square and a green square.",
            ],
        ),
    ],
)
def test_check_answer_strict_about_fact(spec, right, wrong):
    for text in right:
        assert check_answer(SCENE, spec, text), text
    for text in wrong:
        assert not check_answer(SCENE, spec, text), text


def test_questions_about_absent_shapes():
    scene = Scene(
        "two", [SceneObject("circle", "green", "small", 15, 15), SceneObject("square", "red", "large", 45, 45)], "beige"
    )
    spec = parse_question("Which color does the triangle have?")
    assert answer(scene, spec) == "There is no triangle in the image."
    assert check_answer(scene, spec, "There isn't a triangle.")
    assert not check_answer(scene, spec, "The triangle is red.")
    spatial = QuestionSpec("spatial", shape="triangle", other="circle", relation="left")
    assert check_answer(scene, spatial, "There is no triangle in the image.")
    assert not check_answer(scene, spatial, "No, the triangle is to the right of the circle.")


def test_grade_free_text():
    assert grade(SCENE, "How many red objects can you see?", "2") is None  # not a template wording
    assert grade(SCENE, "Count the red objects you can see.", "two") is True
    assert grade(SCENE, "Count the red objects you can see.", "3") is False


def test_random_questions_are_valid_for_their_scene():
    rng = random.Random(0)
    for index in range(200):
        scene = random_scene(f"s{index}", rng)
        assert 1 <= len(scene.objects) <= 3
        assert len({o.shape for o in scene.objects}) == len(scene.objects)
        for family in families_for(scene):
            text, spec = random_question(scene, family, rng)
            assert spec.family == family and parse_question(text) == spec
            present = {o.shape for o in scene.objects}
            assert {s for s in (spec.shape, spec.other) if s and family != "exist"} <= present
            assert check_answer(scene, spec, answer(scene, spec))
    with pytest.raises(ValueError, match="needs two objects"):
        random_question(Scene("one", [SceneObject("circle", "red", "small", 30, 30)], "gray"), "compare", rng)


def test_rendered_objects_are_visible_and_separated():
    rng = random.Random(3)
    for index in range(30):
        scene = random_scene(f"s{index}", rng, image_size=64)
        image = render(scene)
        assert image.size == (64, 64) and image.mode == "RGB"
        for obj in scene.objects:  # the centre pixel has the object's colour
            assert image.getpixel((obj.x, obj.y)) == COLORS[obj.color]
        for a in scene.objects:
            for b in scene.objects:
                if a is not b:
                    assert abs(a.x - b.x) >= 6 and abs(a.y - b.y) >= 6


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_generate_world_is_deterministic_and_llava_format(tmp_path):
    first = generate_world(tmp_path / "a", num_images=12, questions_per_image=4, seed=7, test_images=5)
    generate_world(tmp_path / "b", num_images=12, questions_per_image=4, seed=7, test_images=5)
    generate_world(tmp_path / "c", num_images=12, questions_per_image=4, seed=8, test_images=5)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")

    records = load_llava_records(first.instructions).records  # strict: every record is valid LLaVA
    test_records = load_llava_records(first.test).records
    assert len(records) == 12 and len(test_records) == 5
    assert len(list(first.images_dir.glob("*.png"))) == 17
    scenes = load_scenes(first.scenes)
    assert len(scenes) == 17 and {s.split for s in scenes.values()} == {"train", "test"}
    positions = set()
    for record in records + test_records:
        assert record["image"] == f"{record['id']}.png"
        assert Image.open(first.images_dir / record["image"]).size == (64, 64)
        turns = record["conversations"]
        assert len(turns) == 8  # 4 questions, families mixed
        families = [parse_question(t["value"]).family for t in turns[::2]]
        assert len(set(families)) == 4
        first_value = turns[0]["value"]
        positions.add("before" if first_value.startswith("<image>\n") else "after")
        assert first_value.startswith("<image>\n") or first_value.endswith("\n<image>")
        for human, gpt in zip(turns[::2], turns[1::2]):
            assert grade(scenes[record["id"]], human["value"], gpt["value"]) is True
    assert positions == {"before", "after"}
    assert all("family" in t for r in test_records for t in r["conversations"][::2])
    assert all("family" not in t for r in records for t in r["conversations"])
    captions = json.loads(first.captions.read_text())
    assert [c["id"] for c in captions] == [r["id"] for r in records]
    assert all(c["caption"].endswith(".") for c in captions)


def test_test_split_does_not_change_train_split(tmp_path):
    a = generate_world(tmp_path / "a", num_images=5, questions_per_image=2, seed=1, test_images=0)
    b = generate_world(tmp_path / "b", num_images=5, questions_per_image=2, seed=1, test_images=3)
    assert a.instructions.read_bytes() == b.instructions.read_bytes()


def test_generate_world_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="questions_per_image"):
        generate_world(tmp_path, 1, 0, seed=0)
    with pytest.raises(ValueError, match="image_size"):
        generate_world(tmp_path, 1, 1, seed=0, image_size=16)


def test_load_scenes_names_bad_line(tmp_path):
    path = tmp_path / "scenes.jsonl"
    path.write_text(json.dumps(SCENE.to_dict()) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"scenes.jsonl:2: not a scene record"):
        load_scenes(path)


def test_world_corpus_covers_templates_and_answers():
    corpus = world_corpus(num_scenes=20)
    assert len(corpus) == len(set(corpus))
    assert "Is there a red circle in the image?" in corpus
    assert "There is no triangle in the image." in corpus
    assert any(text.endswith("background.") for text in corpus)
    assert corpus == world_corpus(num_scenes=20)
