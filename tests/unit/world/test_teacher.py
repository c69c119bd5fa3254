"""World teacher examples: targets are right for each job, rendered as served, and deterministic."""

from __future__ import annotations

import json
import random

import pytest

from mmdc import roles
from mmdc.data.augment import contains_answer, is_one_sentence, rouge_l_f, tokenize
from mmdc.train.templates import render_messages, render_turns
from mmdc.world import scenes as world
from mmdc.world import teacher as wt
from mmdc.world.scenes import QuestionSpec, Scene, SceneObject

SCENES = wt.training_scenes(40, seed=0)


def _two_object_scene() -> Scene:
    return Scene(
        "s2",
        [SceneObject("circle", "red", "large", 15, 20), SceneObject("square", "blue", "small", 45, 50)],
        "white",
    )


def test_training_world_is_private_and_deterministic():
    again = wt.training_scenes(40, seed=0)
    assert [s.to_dict() for s in again] == [s.to_dict() for s in SCENES]
    assert [s.to_dict() for s in wt.training_scenes(40, seed=1)] != [s.to_dict() for s in SCENES]
    assert all(s.image_id.startswith("wt_") and s.split == "teacher" for s in SCENES)
    # The world's own test split comes from another stream: no scene coincides.
    test_rng = random.Random("mmdc-world:0:test")
    test = [world.random_scene(f"test_{i:06d}", test_rng) for i in range(40)]
    assert not {tuple(map(tuple, (o.__dict__.values() for o in s.objects))) for s in test} & {
        tuple(map(tuple, (o.__dict__.values() for o in s.objects))) for s in SCENES
    }
    with pytest.raises(ValueError, match="num_images"):
        wt.training_scenes(0, seed=0)


def test_teacher_targets_are_the_world_answer_and_use_table6_prompts():
    rng = random.Random(3)
    for _ in range(200):
        scene = rng.choice(SCENES)
        ex = wt.teacher_example(scene, rng)
        question = ex.user.removeprefix("[Question]\n")
        spec = world.parse_question(question)
        assert spec is not None
        assert ex.target == world.answer(scene, spec)
        assert world.check_answer(scene, spec, ex.target)
        assert ex.system == roles.TEACHER_SYSTEM and ex.user == roles.TEACHER_USER.format(**{"User Question": question})


def test_wrong_answers_fail_and_correct_answers_pass_the_checker():
    rng = random.Random(5)
    kinds = set()
    for _ in range(600):
        scene = rng.choice(SCENES)
        question, spec = wt.random_world_question(scene, rng)
        wrong, kind = wt.wrong_answer(scene, spec, rng)
        right, right_kind = wt.correct_answer(scene, spec, rng)
        assert not world.check_answer(scene, spec, wrong), (question, wrong)
        assert world.check_answer(scene, spec, right), (question, right)
        kinds |= {kind, right_kind}
    assert kinds == set(wt.SCORES)


def test_hand_checked_wrong_answers():
    scene = _two_object_scene()
    rng = random.Random(0)
    spatial = QuestionSpec("spatial", shape="circle", other="square", relation="left")  # true: circle is left
    assert wt._plausible_wrong(scene, spatial, rng) == ("No, the circle is to the right of the square.", "wrong")
    above = QuestionSpec("spatial", shape="square", other="circle", relation="above")  # false: square is below
    assert wt._plausible_wrong(scene, above, rng) == ("Yes, the square is above the circle.", "wrong")
    assert wt._plausible_wrong(scene, QuestionSpec("exist", shape="circle", color="red"), rng) == ("No.", "wrong")
    text, _ = wt._plausible_wrong(scene, QuestionSpec("color", shape="triangle"), rng)  # absent shape: claims a colour
    assert text.startswith("The triangle is ") and not world.check_answer(
        scene, QuestionSpec("color", shape="triangle"), text
    )


def test_referee_targets_reflect_correctness_in_both_orders_and_parse():
    rng = random.Random(7)
    seen_pairs = set()
    for _ in range(150):
        scene = rng.choice(SCENES)
        first, second = wt.referee_examples(scene, rng)
        assert first.system == roles.REFEREE_SYSTEM
        s1, s2 = roles.parse_referee(first.target)
        t1, t2 = roles.parse_referee(second.target)
        assert (s1, s2) == (t2, t1)  # the same pair, swapped
        # Recover the question and both answers from the rendered prompt and check the scores against the truth.
        body = first.user
        question = body.split("[Question]\n", 1)[1].split("\n[Assistant 1]\n", 1)[0]
        a1 = body.split("[Assistant 1]\n", 1)[1].split("\n[End of Assistant 1]", 1)[0]
        a2 = body.split("[Assistant 2]\n", 1)[1].split("\n[End of Assistant 2]", 1)[0]
        assert second.user == roles.referee_messages(question, a2, a1, "")[1]["content"][1]["text"]
        spec = world.parse_question(question)
        for answer, score in ((a1, s1), (a2, s2)):
            if world.check_answer(scene, spec, answer):
                assert score >= 8
            else:
                assert 2 <= score <= 4
        seen_pairs |= {(s1 >= 8, s2 >= 8), (t1 >= 8, t2 >= 8)}
    assert seen_pairs == {(True, True), (True, False), (False, True), (False, False)}


def test_referee_target_sentence():
    assert wt.referee_target(9, 3) == "The scores for Assistant 1 and 2 are 9 and 3, respectively."
    assert roles.parse_referee(wt.referee_target(8, 2)) == (8.0, 2.0)


def test_augmentor_targets_are_valid_new_questions():
    rng = random.Random(11)
    families = set()
    for _ in range(200):
        scene = rng.choice(SCENES)
        ex = wt.augmentor_example(scene, rng)
        assert ex.system == roles.AUGMENTOR_SYSTEM
        given = ex.user.removeprefix("[Question]\n").split(" Please Design a Created Question", 1)[0]
        assert ex.user == roles.augmentor_messages(given, "")[1]["content"][1]["text"]
        given_spec, new_spec = world.parse_question(given), world.parse_question(ex.target)
        assert new_spec is not None and new_spec.family == given_spec.family
        assert wt.template_text(ex.target, new_spec) != wt.template_text(given, given_spec)
        assert rouge_l_f(tokenize(given), tokenize(ex.target)) < 0.7
        assert is_one_sentence(ex.target) and not contains_answer(ex.target)
        assert roles.parse_augmentor(ex.target) == ex.target
        present = {o.shape for o in scene.objects}
        assert {s for s in (new_spec.shape, new_spec.other) if s and new_spec.family != "exist"} <= present
        families.add(new_spec.family)
    assert families == set(world.FAMILIES)


def test_template_index_round_trips():
    spec = QuestionSpec("count", color="red")
    for index, template in enumerate(world.templates_for(spec)):
        text = world.render_question(spec, index)
        assert wt.template_index(text, spec) == index and wt.template_text(text, spec) == template
    assert wt.template_index("Something else entirely?", spec) is None


def test_step_batches_are_deterministic_single_job_and_mixed():
    plan = wt.SCHEDULES["short"]
    a = wt.step_batch(4, SCENES, plan, seed=0)
    assert a == wt.step_batch(4, SCENES, plan, seed=0)
    assert a != wt.step_batch(4, SCENES, plan, seed=1)
    jobs = []
    for step in range(60):
        batch = wt.step_batch(step, SCENES, plan, seed=0)
        assert len(batch) == plan.batch_size and len({ex.job for ex in batch}) == 1
        jobs.append(batch[0].job)
    assert set(jobs) == set(wt.JOBS)


def test_examples_render_exactly_as_the_engine_renders_the_request():
    """Training text = chat template over roles.*_messages (image part first) + the target and stop token."""
    rng = random.Random(13)
    scene = SCENES[0]
    for ex in (wt.teacher_example(scene, rng), wt.referee_examples(scene, rng)[0], wt.augmentor_example(scene, rng)):
        served_messages = [
            {"role": "system", "content": ex.system},
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": ex.user}],
            },
        ]
        served = render_messages(served_messages, add_generation_prompt=True)
        trained = "".join(s.text for s in render_turns(ex.system, [(ex.user.strip(), ex.target.strip())], "before"))
        assert trained == served + f" {ex.target}</s>"


def test_encode_example_supervises_only_the_target():
    from mmdc.world.tiny import train_tokenizer

    tokenizer = train_tokenizer(world.world_corpus(num_scenes=20), vocab_size=600)
    rng = random.Random(17)
    ex = wt.referee_examples(SCENES[1], rng)[0]
    enc = wt.encode_example(tokenizer, ex, image_seq_length=16, max_length=wt.SCHEDULES["full"].max_length)
    supervised = [t for t, label in zip(enc["input_ids"], enc["labels"]) if label != -100]
    assert tokenizer.decode(supervised).strip() == ex.target + "</s>"
    assert enc["input_ids"].count(tokenizer.convert_tokens_to_ids("<image>")) == 16


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    plan = wt.Schedule(steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert wt._lr_factor(0, plan) == pytest.approx(0.1)
    assert wt._lr_factor(9, plan) == pytest.approx(1.0)
    assert wt._lr_factor(10, plan) == pytest.approx(1.0)
    assert wt._lr_factor(99, plan) == pytest.approx(0.1, abs=0.01)
    assert all(wt._lr_factor(s, plan) >= wt._lr_factor(s + 1, plan) for s in range(10, 99))


def test_fingerprint_tracks_schedule_seed_and_tokenizer(tmp_path):
    from mmdc.world.tiny import TEACHER_SPEC, train_tokenizer

    tok = train_tokenizer(["a small corpus about red circles"] * 5, vocab_size=300)
    other = train_tokenizer(["another corpus about blue squares"] * 5, vocab_size=300)
    base = wt.fingerprint("short", 0, tok, TEACHER_SPEC)
    assert base == wt.fingerprint("short", 0, tok, TEACHER_SPEC)
    assert base != wt.fingerprint("full", 0, tok, TEACHER_SPEC)
    assert base != wt.fingerprint("short", 1, tok, TEACHER_SPEC)
    assert base != wt.fingerprint("short", 0, other, TEACHER_SPEC)
    assert wt.read_fingerprint(tmp_path) is None and not wt.is_current(tmp_path, "short", 0)
    with pytest.raises(ValueError, match="schedule"):
        wt.build_world_teacher(tmp_path / "x", schedule="nope")


def test_schedule_overrides_are_typed_recorded_and_checked():
    from mmdc.world.tiny import TEACHER_SPEC, train_tokenizer

    plan = wt.schedule_with("full", ["vision_steps=6000", "lr=1e-3", "mix=[0.4, 0.45, 0.15]"])
    assert (plan.vision_steps, plan.lr, plan.mix) == (6000, 1e-3, (0.4, 0.45, 0.15))
    assert plan.steps == wt.SCHEDULES["full"].steps  # untouched fields keep the named schedule's values
    assert wt.schedule_with("full") == wt.SCHEDULES["full"]
    tok = train_tokenizer(["a small corpus about red circles"] * 5, vocab_size=300)
    assert wt.fingerprint("full", 0, tok, TEACHER_SPEC, []) == wt.fingerprint("full", 0, tok, TEACHER_SPEC)
    changed = wt.fingerprint("full", 0, tok, TEACHER_SPEC, ["vision_steps=6000"])
    assert changed != wt.fingerprint("full", 0, tok, TEACHER_SPEC) and changed["schedule"]["vision_steps"] == 6000
    with pytest.raises(ValueError, match="unknown config key 'vison_steps'.*vision_steps"):
        wt.schedule_with("full", ["vison_steps=6000"])
    with pytest.raises(ValueError, match="'steps' must be an integer, got 'many'"):
        wt.schedule_with("full", ["steps=many"])
    with pytest.raises(ValueError, match="'mix' must be a list of 3 values"):
        wt.schedule_with("full", ["mix=[0.5, 0.5]"])
    with pytest.raises(ValueError, match="key.path=value"):
        wt.schedule_with("full", ["steps"])
    with pytest.raises(SystemExit):
        wt.main(["--out", "/nonexistent/never-built", "--set", "vison_steps=1"])


def test_a_fingerprint_read_back_from_its_file_still_matches(tmp_path):
    """A built teacher must count as current: JSON turns the schedule's tuples into lists (a rebuild every run)."""
    from mmdc.world.tiny import TEACHER_SPEC, train_tokenizer

    tok = train_tokenizer(["a small corpus about red circles"] * 5, vocab_size=300)
    wanted = wt.fingerprint("short", 0, tok, TEACHER_SPEC)
    assert any(isinstance(v, tuple) for v in wanted["schedule"].values())  # what made the round trip lossy
    (tmp_path / wt.FINGERPRINT_FILE).write_text(json.dumps(wanted, indent=2, sort_keys=True))
    assert wt.fingerprint_matches(wt.read_fingerprint(tmp_path), wanted)
    assert not wt.fingerprint_matches(wt.read_fingerprint(tmp_path), wt.fingerprint("short", 1, tok, TEACHER_SPEC))


def test_tokenizer_is_the_students(tmp_path):
    """The teacher's tokenizer is trained as ensure_tiny_models trains the student's (same texts -> same BPE)."""
    from transformers import AutoTokenizer

    from mmdc.world.tiny import ensure_tiny_models, train_tokenizer

    texts = world.world_corpus(num_scenes=10)
    student = AutoTokenizer.from_pretrained(ensure_tiny_models(tmp_path, texts, seed=0)["student"])
    assert train_tokenizer(texts).backend_tokenizer.to_str() == student.backend_tokenizer.to_str()


def test_perception_targets_match_the_scene():
    scene = _two_object_scene()  # large red circle at (15, 20), small blue square at (45, 50)
    t = wt.perception_targets(scene, patch_size=16)
    shapes, colors = list(world.SHAPES), list(world.COLORS)
    assert t["local"].shape == (16, 11) and t["color"].shape == (3,) and t["xy"].shape == (3, 2)
    circle, square, triangle = (shapes.index(s) for s in ("circle", "square", "triangle"))
    assert t["color"][circle] == colors.index("red") and t["color"][square] == colors.index("blue")
    assert t["color"][triangle] == len(colors) and t["size"][triangle] == len(world.SIZES)  # absent
    assert t["size"][circle] == world.SIZES.index("large") and t["size"][square] == world.SIZES.index("small")
    assert t["count"] == 1 and t["background"] == list(world.BACKGROUNDS).index("white")
    assert list(t["present"]) == [1, 1, 0]
    assert tuple(t["xy"][circle]) == pytest.approx((15 / 64, 20 / 64))
    centre = t["local"][:, 3 + len(colors) :]  # [P, shapes]
    assert centre[1 * 4 + 0, circle] == 1 and centre[3 * 4 + 2, square] == 1 and centre.sum() == 2
    cover = t["local"][:, :3]
    assert cover[1 * 4 + 0, circle] == 1 and cover[:, triangle].sum() == 0 and cover[0 * 4 + 3].sum() == 0
    red = t["local"][:, 3 + colors.index("red")]
    assert (red == cover[:, circle]).all()  # the only red object is the circle


def test_object_masks_are_the_rendered_pixels():
    import numpy as np

    for scene in SCENES[:10]:
        masks = wt.object_masks(scene)
        image = np.asarray(world.render(scene))
        assert masks.shape == (len(scene.objects), 64, 64) and not (masks.sum(axis=0) > 1).any()  # no overlap
        for obj, mask in zip(scene.objects, masks):
            assert (image[mask] == world.COLORS[obj.color]).all()


def test_perception_loss_is_lowest_at_the_targets():
    import torch

    targets = wt.stack_targets(SCENES[:4], patch_size=16)
    logits = torch.zeros(4, 16, wt.PERCEPTION_OUTPUTS)
    base = wt.perception_loss(logits, targets).item()
    assert base > 0
    acc = wt.perception_accuracy(logits, targets)
    assert set(acc) == {"local", "color", "size"} and all(0 <= v <= 1 for v in acc.values())


def test_perception_batches_are_deterministic():
    a = wt._perception_batch(3, 100, 8, seed=0)
    assert a.tolist() == wt._perception_batch(3, 100, 8, seed=0).tolist()
    assert a.tolist() != wt._perception_batch(4, 100, 8, seed=0).tolist()
