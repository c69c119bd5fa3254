"""The world teacher: the tiny teacher trained on the synthetic world for its three Table 6 jobs.

A random tiny LLaVA proves only plumbing (its referee never replies in a parseable format), so the embedded
default trains one locally on the world's ground truth: answer (``world.answer``), referee (the paper's score
sentence from each answer's correctness, both orders) and augmentor (a new question of the same family in
another template), every example rendered exactly as the engine renders it. Vision first: the tower and
projector learn dense perception targets, then everything learns the three jobs. Its private training world
never overlaps a run's data or the test split. Design and history: docs/world_teacher.md; measured quality:
benchmarks/results/teacher_quality.md.

    python -m mmdc.world.teacher --out /tmp/world_teacher [--schedule short] [--seed 0] [--set FIELD=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mmdc import roles
from mmdc.config import replace_fields
from mmdc.data.augment import rouge_l_f, tokenize
from mmdc.world import scenes as world
from mmdc.world.scenes import QuestionSpec, Scene

if TYPE_CHECKING:
    import numpy as np

# Bump when examples, training or saving change so that built teachers are stale.
BUILDER_VERSION = 2  # 2: vision-first stage and perception loss
FINGERPRINT_FILE = "world_teacher.json"
SUBDIR = "world_teacher"
JOBS = ("teacher", "referee", "augmentor")

# Referee targets: a score per kind of answer. Deterministic, so the referee learns correctness, not noise.
SCORES = {"correct": 9, "correct_short": 8, "near_miss": 4, "wrong": 3, "garbled": 2}
CORRECT_KINDS = ("correct", "correct_short")
# The world's relation phrases (world keeps its own copy private).
_REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Share of "questions about a shape that is not there": the world never asks them, generated questions might.
ABSENT_RATE = 0.05


@dataclass(frozen=True)
class Schedule:
    """How much to train. Step counts, not wall time, so a build is reproducible on any machine."""

    steps: int  # optimizer steps; each step is one batch of a single job (lengths differ a lot per job)
    batch_size: int = 16  # examples per step (referee: batch_size // 2 answer pairs, each in both orders)
    lr: float = 1.5e-3  # peak AdamW learning rate (from scratch, ~3M parameters)
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    num_images: int = 1200  # private training scenes
    max_length: int = 384  # longest referee prompt with two descriptions is ~280 tokens
    mix: tuple[float, float, float] = (0.45, 0.35, 0.2)  # share of steps per job, in JOBS order
    # Stage 1 (vision first): vision tower + projector alone on the dense perception targets, before any text.
    vision_steps: int = 0  # perception-only steps (cheap: no LM forward)
    vision_batch_size: int = 64  # images per perception step
    vision_lr: float = 3e-3  # peak learning rate of stage 1 (same warmup + cosine shape)
    # Stage 2 (all jobs): the perception loss stays on as an auxiliary term, so answering cannot wash it out.
    aux_weight: float = 0.0  # weight of the perception loss added to each step's LM loss
    vision_lr_scale: float = 1.0  # stage 2 learning rate of the vision tower and projector, relative to lr


# "full": 178 s on a quiet 2-core machine (benchmarks/results/demo_run.md); "short": a quarter of its steps, for
# CI (plumbing plus a parseable referee, not accuracy).
# Both see first: stage 1 trains the vision tower on perception targets (seconds per hundred steps), which
# the LM gradient alone does not manage in this budget (benchmarks/results/teacher_quality.md).
SCHEDULES = {
    "full": Schedule(steps=600, num_images=4000, vision_steps=1500, aux_weight=0.5),
    "short": Schedule(steps=150, num_images=1500, vision_steps=400, aux_weight=0.5),
}


@dataclass(frozen=True)
class Example:
    """One supervised example: the request as the engine sees it (system, user text, image) and the target reply."""

    job: str
    image_id: str
    system: str
    user: str
    target: str


# ----------------------------------------------------------------------------- scenes


def training_scenes(num_images: int, seed: int, image_size: int = 64) -> list[Scene]:
    """The private training world: ``num_images`` scenes from a stream no run or test split uses."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    rng = random.Random(f"mmdc-world-teacher:{seed}")
    return [world.random_scene(f"wt_{i:06d}", rng, image_size, split="teacher") for i in range(num_images)]


# ----------------------------------------------------------------------------- requests


def _request(messages: list[dict]) -> tuple[str, str]:
    """(system, user text) of a roles.*_messages request; checks the image part comes first."""
    system, user = messages
    parts = user["content"]
    if [p["type"] for p in parts] != ["image_url", "text"]:
        raise ValueError(f"expected the image part before the text part, got {[p['type'] for p in parts]}")
    return system["content"], parts[1]["text"]


def _example(job: str, scene: Scene, messages: list[dict], target: str) -> Example:
    system, user = _request(messages)
    return Example(job=job, image_id=scene.image_id, system=system, user=user, target=target)


# ----------------------------------------------------------------------------- questions


def random_world_question(scene: Scene, rng: random.Random) -> tuple[str, QuestionSpec]:
    """A question valid for ``scene`` (family uniform over those that fit), rarely one about an absent shape."""
    family = rng.choice(world.families_for(scene))
    text, spec = world.random_question(scene, family, rng)
    if family in ("color", "spatial", "compare") and rng.random() < ABSENT_RATE:
        present = {o.shape for o in scene.objects}
        absent = [s for s in world.SHAPES if s not in present]
        if absent:
            spec = dataclasses.replace(spec, shape=rng.choice(absent))
            text = world.render_question(spec, rng.randrange(len(world.templates_for(spec))))
    return text, spec


def template_index(question: str, spec: QuestionSpec) -> int | None:
    """Index in ``world.templates_for(spec)`` of the template ``question`` was rendered with, or None."""
    key = question.strip().lower().rstrip("?.! ")
    for index in range(len(world.templates_for(spec))):
        if world.render_question(spec, index).lower().rstrip("?.! ") == key:
            return index
    return None


# ----------------------------------------------------------------------------- answers


def _listed(objects: Sequence[world.SceneObject], sizes: bool = True) -> str:
    parts = [f"a {o.size + ' ' if sizes else ''}{o.color} {o.shape}" for o in sorted(objects, key=lambda o: o.x)]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def short_answer(scene: Scene, spec: QuestionSpec) -> str | None:
    """A terser correct phrasing of ``world.answer`` (students answer in several styles), or None."""
    truth = world.answer(scene, spec)
    if truth.startswith("There is no "):
        return f"I cannot see a {truth[len('There is no ') :].split()[0]} in the image."
    if spec.family in ("exist", "spatial"):
        return truth.split(",")[0].rstrip(".") + "."
    if spec.family == "color":
        color = scene.find(spec.shape).color
        return f"{color.capitalize()}."
    if spec.family == "count":
        n = sum(1 for o in scene.objects if spec.color is None or o.color == spec.color)
        return f"{n}." if n else "None."
    if spec.family == "compare":
        a, b = scene.find(spec.shape), scene.find(spec.other)
        if a.size == b.size:
            return "They are the same size."
        return f"The {(a if a.size == 'large' else b).shape}."
    if spec.family == "describe":
        return f"The image shows {_listed(scene.objects)}."
    return None


def correct_answer(scene: Scene, spec: QuestionSpec, rng: random.Random) -> tuple[str, str]:
    """(text, kind): the canonical truth, or (1 in 4) a short correct phrasing; always passes check_answer."""
    if rng.random() < 0.25:
        short = short_answer(scene, spec)
        if short is not None and world.check_answer(scene, spec, short):
            return short, "correct_short"
    return world.answer(scene, spec), "correct"


def _other(values: Sequence[str], exclude: str, rng: random.Random) -> str:
    return rng.choice([v for v in values if v != exclude])


def _plausible_wrong(scene: Scene, spec: QuestionSpec, rng: random.Random) -> tuple[str, str]:
    """A fluent answer in the truth's style that states a wrong fact: (text, kind)."""
    truth = world.answer(scene, spec)
    if truth.startswith("There is no "):  # claims an attribute of a shape that is not there
        shape = truth[len("There is no ") :].split()[0]
        return f"The {shape} is {rng.choice(tuple(world.COLORS))}.", "wrong"
    if spec.family == "exist":
        return ("No." if truth == "Yes." else "Yes."), "wrong"
    if spec.family == "color":
        return f"The {spec.shape} is {_other(tuple(world.COLORS), scene.find(spec.shape).color, rng)}.", "wrong"
    if spec.family == "count":
        n = sum(1 for o in scene.objects if spec.color is None or o.color == spec.color)
        wrong = rng.choice([k for k in range(0, 5) if k != n])
        noun = f"{spec.color} shape" if spec.color else "shape"
        text = (
            f"There are no {noun}s."
            if wrong == 0
            else (f"There is 1 {noun}." if wrong == 1 else f"There are {wrong} {noun}s.")
        )
        return text, "wrong"
    if spec.family == "spatial":
        if truth.startswith("Yes"):
            return f"No, the {spec.shape} is {_REL_PHRASE[_OPPOSITE[spec.relation]]} the {spec.other}.", "wrong"
        return f"Yes, the {spec.shape} is {_REL_PHRASE[spec.relation]} the {spec.other}.", "wrong"
    if spec.family == "compare":
        claims = {
            spec.shape: f"The {spec.shape} is larger than the {spec.other}.",
            spec.other: f"The {spec.other} is larger than the {spec.shape}.",
            "same": f"The {spec.shape} and the {spec.other} are the same size.",
        }
        a, b = scene.find(spec.shape), scene.find(spec.other)
        true_claim = "same" if a.size == b.size else (a.shape if a.size == "large" else b.shape)
        return claims[_other(tuple(claims), true_claim, rng)], "wrong"
    if spec.family == "describe":
        return _wrong_description(scene, rng), "near_miss"
    raise ValueError(f"unknown question family {spec.family!r}")


def _wrong_description(scene: Scene, rng: random.Random) -> str:
    """A description of ``scene`` one edit away: a colour, shape or size changed, or an object dropped."""
    objects = list(scene.objects)
    index = rng.randrange(len(objects))
    obj = objects[index]
    edit = rng.choice(["color", "shape", "size", "drop"] if len(objects) > 1 else ["color", "shape", "size"])
    if edit == "drop":
        del objects[index]
    elif edit == "color":
        objects[index] = dataclasses.replace(obj, color=_other(tuple(world.COLORS), obj.color, rng))
    elif edit == "size":
        objects[index] = dataclasses.replace(obj, size=_other(world.SIZES, obj.size, rng))
    else:
        taken = {o.shape for o in objects}
        free = [s for s in world.SHAPES if s not in taken]
        if not free:  # all three shapes present: swap two objects' colours instead
            other = rng.choice([k for k in range(len(objects)) if objects[k].color != obj.color] or [index])
            if other == index:
                objects[index] = dataclasses.replace(obj, color=_other(tuple(world.COLORS), obj.color, rng))
            else:
                objects[index] = dataclasses.replace(obj, color=objects[other].color)
                objects[other] = dataclasses.replace(objects[other], color=obj.color)
        else:
            objects[index] = dataclasses.replace(obj, shape=rng.choice(free))
    return world.describe(dataclasses.replace(scene, objects=objects))


_GARBLED_FIXED = ("", "I don't know.", "The image.", "Sorry, I cannot answer that.", "the the the")


def _garbled(scene: Scene, spec: QuestionSpec, rng: random.Random) -> str:
    """An answer a weak student gives: empty, evasive, or the truth's words shuffled into nonsense."""
    if rng.random() < 0.5:
        return rng.choice(_GARBLED_FIXED)
    words = world.answer(scene, spec).rstrip(".").split()
    words += rng.sample(["shape", "circle", "square", "triangle", "red", "blue", "image", "the", "is"], 3)
    rng.shuffle(words)
    return " ".join(words[: rng.randint(1, len(words))])


def wrong_answer(scene: Scene, spec: QuestionSpec, rng: random.Random) -> tuple[str, str]:
    """(text, kind) of an answer that fails ``world.check_answer``: plausible (3 in 4) or garbled."""
    for _ in range(20):
        text, kind = (
            _plausible_wrong(scene, spec, rng) if rng.random() < 0.75 else (_garbled(scene, spec, rng), "garbled")
        )
        if not world.check_answer(scene, spec, text):
            return text, kind
    return "", "garbled"  # an empty reply is never right


def referee_target(score_1: float, score_2: float) -> str:
    """The paper's output sentence (Table 6) for two scores."""
    return f"The scores for Assistant 1 and 2 are {score_1:g} and {score_2:g}, respectively."


# ----------------------------------------------------------------------------- examples per job


def teacher_example(scene: Scene, rng: random.Random) -> Example:
    """Teacher job: question -> the canonical true answer."""
    question, spec = random_world_question(scene, rng)
    return _example("teacher", scene, roles.teacher_messages(question, ""), world.answer(scene, spec))


def referee_examples(scene: Scene, rng: random.Random) -> list[Example]:
    """Referee job: one answer pair in both orders (2 examples); scores reflect each answer's correctness.

    Pairs are (correct, wrong) half the time, (correct, correct) and (wrong, wrong) a quarter each:
    the assessment sees all three (a right and a wrong student against a mostly right teacher).
    """
    question, spec = random_world_question(scene, rng)
    roll = rng.random()
    first = correct_answer(scene, spec, rng) if roll < 0.75 else wrong_answer(scene, spec, rng)
    second = wrong_answer(scene, spec, rng) if roll < 0.5 or roll >= 0.75 else correct_answer(scene, spec, rng)
    out = []
    for (a1, k1), (a2, k2) in ((first, second), (second, first)):
        target = referee_target(SCORES[k1], SCORES[k2])
        out.append(_example("referee", scene, roles.referee_messages(question, a1, a2, ""), target))
    return out


def augmented_question(scene: Scene, question: str, spec: QuestionSpec, rng: random.Random) -> str | None:
    """A new question of ``spec.family`` valid for ``scene``, in another template, ROUGE-L < 0.7; None if none found.

    "Another template" compares template texts, so a count question with a colour never comes back
    as the same wording without one; ROUGE-L is the pipeline's own novelty test.
    """
    given = template_text(question, spec)
    given_tokens = tokenize(question)
    for _ in range(40):
        text, new_spec = world.random_question(scene, spec.family, rng)
        if template_text(text, new_spec) == given:
            continue
        if rouge_l_f(given_tokens, tokenize(text)) < 0.7:
            return text
    return None


def template_text(question: str, spec: QuestionSpec) -> str | None:
    """The raw template (``world.TEMPLATES`` entry) ``question`` was rendered from, or None."""
    index = template_index(question, spec)
    return None if index is None else world.templates_for(spec)[index]


def augmentor_example(scene: Scene, rng: random.Random) -> Example:
    """Augmentor job: given question -> a new question (same family, other template, valid for the scene)."""
    for _ in range(20):
        family = rng.choice(world.families_for(scene))
        question, spec = world.random_question(scene, family, rng)
        new = augmented_question(scene, question, spec, rng)
        if new is not None:
            return _example("augmentor", scene, roles.augmentor_messages(question, ""), new)
    raise RuntimeError(f"scene {scene.image_id}: no augmentable question found in 20 tries")


def job_batch(job: str, scenes: Sequence[Scene], batch_size: int, rng: random.Random) -> list[Example]:
    """``batch_size`` examples of one job on random scenes (one job per batch keeps padding low)."""
    if job == "teacher":
        return [teacher_example(rng.choice(scenes), rng) for _ in range(batch_size)]
    if job == "referee":
        return [ex for _ in range(max(1, batch_size // 2)) for ex in referee_examples(rng.choice(scenes), rng)]
    if job == "augmentor":
        return [augmentor_example(rng.choice(scenes), rng) for _ in range(batch_size)]
    raise ValueError(f"unknown job {job!r}; jobs are {JOBS}")


def step_batch(step: int, scenes: Sequence[Scene], schedule: Schedule, seed: int) -> list[Example]:
    """The examples of optimizer step ``step``: a pure function of (step, scenes, schedule, seed)."""
    rng = random.Random(f"mmdc-world-teacher-step:{seed}:{step}")
    job = rng.choices(JOBS, weights=schedule.mix)[0]
    return job_batch(job, scenes, schedule.batch_size, rng)


def encode_example(tokenizer, example: Example, image_seq_length: int, max_length: int) -> dict:
    """Tokenize ``example`` exactly as served: system + user text with the image before it, loss on the target."""
    from mmdc.train.formatting import encode_conversation

    row = {
        "conversation_id": f"{example.job}:{example.image_id}",
        "questions": [example.user],
        "answers": [example.target],
    }
    return encode_conversation(
        tokenizer, row, "before", max_length, image_seq_length=image_seq_length, system=example.system
    )


# ----------------------------------------------------------------------------- perception targets

# What the perception loss reads off each image token (a linear head on the projector output). Local parts are
# about the token's own patch, global parts are the whole scene (every token predicts them, so each image token
# carries the scene and the LM can read it wherever it attends). Each shape occurs at most once per scene, so
# "the circle's colour" is well defined.
#   local, binary:  cover[shape] (3), cover[colour] (5), centre[shape] (3)       -> BCE
#   global, class:  colour-or-absent per shape (3 x 6), size-or-absent per shape (3 x 3),
#                   background (3), object count 1..3 (3)                        -> CE
#   global, value:  centre x, y per present shape, in [0, 1] (3 x 2)             -> MSE
_N_LOCAL = len(world.SHAPES) + len(world.COLORS) + len(world.SHAPES)
_N_COLOR, _N_SIZE = len(world.COLORS) + 1, len(world.SIZES) + 1
PERCEPTION_OUTPUTS = (
    _N_LOCAL + len(world.SHAPES) * (_N_COLOR + _N_SIZE) + len(world.BACKGROUNDS) + 3 + 2 * len(world.SHAPES)
)
_MIN_COVER = 4  # pixels of an object inside a patch for the patch to count as covered


def object_masks(scene: Scene) -> np.ndarray:
    """[objects, H, W] bool: the pixels each object covers, drawn alone by ``world.render`` (so exactly as shown)."""
    import numpy as np

    masks = []
    for obj in scene.objects:
        alone = dataclasses.replace(scene, objects=[obj], background="white")
        masks.append((np.asarray(world.render(alone), dtype=np.int16) != 255).any(axis=-1))
    return np.stack(masks)


def perception_targets(scene: Scene, patch_size: int) -> dict:
    """The perception targets of one scene (see PERCEPTION_OUTPUTS) as numpy arrays; P = patches."""
    import numpy as np

    side = scene.image_size
    grid = side // patch_size
    masks = object_masks(scene)  # [objects, H, W]
    per_patch = masks.reshape(len(scene.objects), grid, patch_size, grid, patch_size).sum(
        axis=(2, 4)
    )  # [objects, g, g]
    per_patch = per_patch.reshape(len(scene.objects), grid * grid)  # [objects, P]
    colors, shapes = list(world.COLORS), list(world.SHAPES)
    local = np.zeros((grid * grid, _N_LOCAL), dtype=np.float32)  # [P, 11]
    color_cls = np.full(len(shapes), len(colors), dtype=np.int64)  # absent = last class
    size_cls = np.full(len(shapes), len(world.SIZES), dtype=np.int64)
    xy = np.zeros((len(shapes), 2), dtype=np.float32)
    present = np.zeros(len(shapes), dtype=np.float32)
    for k, obj in enumerate(scene.objects):
        s, c = shapes.index(obj.shape), colors.index(obj.color)
        covered = per_patch[k] >= _MIN_COVER
        local[covered, s] = 1
        local[covered, len(shapes) + c] = 1
        centre = min(obj.y // patch_size, grid - 1) * grid + min(obj.x // patch_size, grid - 1)
        local[centre, len(shapes) + len(colors) + s] = 1
        color_cls[s], size_cls[s] = c, world.SIZES.index(obj.size)
        xy[s] = (obj.x / side, obj.y / side)
        present[s] = 1
    return {
        "local": local,
        "color": color_cls,
        "size": size_cls,
        "background": np.int64(list(world.BACKGROUNDS).index(scene.background)),
        "count": np.int64(len(scene.objects) - 1),
        "xy": xy,
        "present": present,
    }


def stack_targets(scenes: Sequence[Scene], patch_size: int) -> dict:
    """``perception_targets`` of every scene as tensors with a leading [N] dimension."""
    import numpy as np
    import torch

    rows = [perception_targets(s, patch_size) for s in scenes]
    return {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in rows[0]}


def perception_loss(logits, targets: dict):
    """Mean of the perception losses; ``logits`` [batch, P, PERCEPTION_OUTPUTS], targets from ``stack_targets``."""
    import torch
    import torch.nn.functional as F

    n_shapes = len(world.SHAPES)
    batch, patches, _ = logits.shape
    local, rest = logits[..., :_N_LOCAL], logits[..., _N_LOCAL:]
    color, rest = rest[..., : n_shapes * _N_COLOR], rest[..., n_shapes * _N_COLOR :]
    size, rest = rest[..., : n_shapes * _N_SIZE], rest[..., n_shapes * _N_SIZE :]
    background, count, xy = rest[..., :3], rest[..., 3:6], rest[..., 6:]

    def global_ce(part, target, classes):  # part [batch, P, n * classes], target [batch, n] or [batch]
        target = target.reshape(batch, 1, -1).expand(batch, patches, -1)  # [batch, P, n]
        return F.cross_entropy(part.reshape(-1, classes), target.reshape(-1))

    losses = [
        F.binary_cross_entropy_with_logits(local, targets["local"]),
        global_ce(color, targets["color"], _N_COLOR),
        global_ce(size, targets["size"], _N_SIZE),
        global_ce(background, targets["background"], 3),
        global_ce(count, targets["count"], 3),
    ]
    present = targets["present"][:, None, :, None]  # [batch, 1, shapes, 1]
    err = (torch.sigmoid(xy.reshape(batch, patches, n_shapes, 2)) - targets["xy"][:, None]) ** 2
    losses.append(10 * (err * present).sum() / (present.sum() * patches * 2).clamp(min=1))
    return sum(losses) / len(losses)


def perception_accuracy(logits, targets: dict) -> dict[str, float]:
    """Per-token accuracy of the global colour and size heads over present shapes, and of local cover bits."""
    n_shapes = len(world.SHAPES)
    batch, patches, _ = logits.shape
    local = logits[..., :_N_LOCAL]
    color = logits[..., _N_LOCAL : _N_LOCAL + n_shapes * _N_COLOR].reshape(batch, patches, n_shapes, _N_COLOR)
    start = _N_LOCAL + n_shapes * _N_COLOR
    size = logits[..., start : start + n_shapes * _N_SIZE].reshape(batch, patches, n_shapes, _N_SIZE)
    present = targets["present"][:, None, :].expand(batch, patches, n_shapes).bool()
    color_ok = color.argmax(-1) == targets["color"][:, None, :]
    size_ok = size.argmax(-1) == targets["size"][:, None, :]
    return {
        "local": ((local > 0).float() == targets["local"]).float().mean().item(),
        "color": color_ok[present].float().mean().item(),
        "size": size_ok[present].float().mean().item(),
    }


# ----------------------------------------------------------------------------- tokenizer and fingerprint


def default_tokenizer_texts() -> list[str]:
    """The texts the run's shared tiny tokenizer is trained on (mirrors mmdc.world.models.resolve).

    The Table 6 prompts are added by ``tiny.tokenizer_corpus`` itself.
    """
    return world.world_corpus()


def _tokenizer_sha(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def schedule_with(name: str, overrides: Sequence[str] = ()) -> Schedule:
    """Schedule ``name`` with ``field=value`` overrides (``--set``), parsed and checked like the run's config overrides.

    For experiments (``--set vision_steps=6000 --set 'mix=[0.4,0.45,0.15]'``). An unknown schedule or
    field, or a value of the wrong type, raises ``ValueError`` naming it.
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    return replace_fields(SCHEDULES[name], overrides)


def fingerprint(schedule_name: str, seed: int, tokenizer, spec, overrides: Sequence[str] = ()) -> dict:
    """What a world teacher was built from; any change (overrides included) means rebuild."""
    return {
        "builder_version": BUILDER_VERSION,
        "schedule_name": schedule_name,
        "schedule": dataclasses.asdict(schedule_with(schedule_name, overrides)),
        "seed": seed,
        "tokenizer_sha256": _tokenizer_sha(tokenizer),
        "corpus_sha256": _corpus_sha(),
        "spec": dataclasses.asdict(spec),
    }


def _corpus_sha() -> str:
    """Hash of what the examples are made of: world templates, colours, shapes and the Table 6 prompts."""
    payload = json.dumps(
        {
            "templates": world.TEMPLATES,
            "colors": world.COLORS,
            "shapes": world.SHAPES,
            "backgrounds": world.BACKGROUNDS,
            "prompts": [
                getattr(roles, n)
                for n in (
                    "TEACHER_SYSTEM",
                    "TEACHER_USER",
                    "REFEREE_SYSTEM",
                    "REFEREE_USER",
                    "AUGMENTOR_SYSTEM",
                    "AUGMENTOR_USER",
                )
            ],
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- training


def _lr_factor(step: int, schedule: Schedule) -> float:
    """Linear warmup, then cosine from 1 down to ``min_lr_ratio``."""
    warmup = max(1, round(schedule.warmup_ratio * schedule.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, schedule.steps - warmup)
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def image_features(model, pixels):
    """The image tokens the LM sees: projector output for ``pixels`` [batch, 3, H, W] -> [batch, P, text_hidden]."""
    import torch

    out = model.model.get_image_features(
        pixel_values=pixels,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    )
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


def _perception_batch(step: int, n: int, batch_size: int, seed: int):
    """Scene indices of perception step ``step``: a pure function of its arguments."""
    import torch

    generator = torch.Generator().manual_seed(
        int(hashlib.sha256(f"perception:{seed}:{step}".encode()).hexdigest()[:8], 16)
    )
    return torch.randint(n, (batch_size,), generator=generator)


def train_perception(model, head, pixels, targets: dict, plan: Schedule, seed: int, log: Callable[[str], None]) -> dict:
    """Stage 1: train the vision tower, projector and ``head`` on the perception targets; return the final loss."""
    import torch

    params = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
        *head.parameters(),
    ]
    optimizer = torch.optim.AdamW(params, lr=plan.vision_lr, betas=(0.9, 0.98), weight_decay=plan.weight_decay)
    stage = dataclasses.replace(plan, steps=plan.vision_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, stage))
    started, smooth = time.perf_counter(), None
    for step in range(plan.vision_steps):
        idx = _perception_batch(step, len(pixels), plan.vision_batch_size, seed)
        logits = head(image_features(model, pixels[idx].float()))  # [batch, P, PERCEPTION_OUTPUTS]
        loss = perception_loss(logits, {k: v[idx] for k, v in targets.items()})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == plan.vision_steps:
            acc = perception_accuracy(logits.detach(), {k: v[idx] for k, v in targets.items()})
            log(
                f"vision step {step + 1}/{plan.vision_steps} perception loss {smooth:.3f} "
                f"acc[{' '.join(f'{k}={v:.2f}' for k, v in acc.items())}] elapsed={time.perf_counter() - started:.0f}s"
            )
    return {"perception_loss": round(smooth, 4)} if smooth is not None else {}


def build_world_teacher(
    out_dir: str | os.PathLike,
    seed: int = 0,
    schedule: str = "full",
    tokenizer_texts: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    overrides: Sequence[str] = (),
) -> str:
    """Train the world teacher and save it (model + processor, HF format) atomically at ``out_dir``; return it.

    The tokenizer is the run's shared one (trained on ``tokenizer_texts``,
    default: what the driver uses), so teacher and student tokenize alike.
    ``overrides`` replace schedule fields (``schedule_with``); the fingerprint
    records them, so such a build never passes for the built default.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmdc.train.formatting import collate, pixel_values
    from mmdc.world.tiny import TEACHER_SPEC, build_tiny_llava, train_tokenizer

    plan = schedule_with(schedule, overrides)
    spec = TEACHER_SPEC
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    started = time.perf_counter()
    try:
        tokenizer = train_tokenizer(list(default_tokenizer_texts() if tokenizer_texts is None else tokenizer_texts))
        build_tiny_llava(tmp, spec, tokenizer, seed)
        processor = AutoProcessor.from_pretrained(tmp)
        model = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        image_seq_length = model.config.image_seq_length

        scenes = training_scenes(plan.num_images, seed, spec.image_size)
        index = {s.image_id: i for i, s in enumerate(scenes)}
        pixels = torch.cat(
            [  # [N, 3, H, W]; stored in half precision (flat colours: exact to ~1e-3), 4000 scenes = 100 MB
                pixel_values(processor.image_processor, [world.render(s) for s in scenes[i : i + 500]]).half()
                for i in range(0, len(scenes), 500)
            ]
        )
        targets = stack_targets(scenes, spec.patch_size)  # perception targets, [N, ...]
        head = torch.nn.Linear(spec.text_hidden, PERCEPTION_OUTPUTS)  # perception readout, not saved
        log(
            f"world teacher: {schedule} schedule, {plan.vision_steps} vision steps x {plan.vision_batch_size}, "
            f"{plan.steps} steps x {plan.batch_size}, {len(scenes)} scenes, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
        )
        perception = train_perception(model, head, pixels, targets, plan, seed, log) if plan.vision_steps else {}

        vision = {
            id(p) for p in (*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters())
        }
        groups = []
        for is_vision, scale in ((False, 1.0), (True, plan.vision_lr_scale)):
            named = [(n, p) for n, p in model.named_parameters() if (id(p) in vision) == is_vision]
            if is_vision:
                named += list(head.named_parameters())
            groups += [
                {
                    "params": [p for _, p in named if p.ndim >= 2],
                    "weight_decay": plan.weight_decay,
                    "lr": plan.lr * scale,
                },
                {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0, "lr": plan.lr * scale},
            ]
        optimizer = torch.optim.AdamW(groups, lr=plan.lr, betas=(0.9, 0.98))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, plan))
        pad_id = tokenizer.pad_token_id
        losses: dict[str, float] = {}
        seen, last_t, last_seen = 0, time.perf_counter(), 0
        for step in range(plan.steps):
            examples = step_batch(step, scenes, plan, seed)
            encoded = [encode_example(tokenizer, ex, image_seq_length, plan.max_length) for ex in examples]
            batch = collate(encoded, pad_id)
            rows = torch.tensor([index[ex.image_id] for ex in examples])
            batch["pixel_values"] = pixels[rows].float()  # [batch, 3, H, W]
            loss = model(**batch).loss
            total = loss
            if plan.aux_weight:
                aux = perception_loss(
                    head(image_features(model, batch["pixel_values"])), {k: v[rows] for k, v in targets.items()}
                )
                total = loss + plan.aux_weight * aux
                losses["perception"] = (
                    aux.item() if "perception" not in losses else 0.9 * losses["perception"] + 0.1 * aux.item()
                )
            total.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            job = examples[0].job
            losses[job] = loss.item() if job not in losses else 0.9 * losses[job] + 0.1 * loss.item()
            seen += len(examples)
            if (step + 1) % 10 == 0 or step + 1 == plan.steps:
                now = time.perf_counter()
                rate = (seen - last_seen) / max(now - last_t, 1e-9)
                last_t, last_seen = now, seen
                shown = " ".join(f"{j}={losses[j]:.3f}" for j in (*JOBS, "perception") if j in losses)
                log(
                    f"step {step + 1}/{plan.steps} loss[{shown}] lr={scheduler.get_last_lr()[0]:.2e} "
                    f"{rate:.1f} examples/s elapsed={now - started:.0f}s"
                )

        model.eval()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        info = fingerprint(schedule, seed, tokenizer, spec, overrides)
        info["build_seconds"] = round(time.perf_counter() - started, 1)
        info["final_losses"] = {j: round(v, 4) for j, v in losses.items()}
        info["stage1"] = perception
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"world teacher saved to {out} in {time.perf_counter() - started:.0f}s")
    return str(out)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` onto ``dst``; an existing ``dst`` is moved aside first (a rename cannot replace a folder)."""
    if dst.exists():
        stale = dst.parent / f".{dst.name}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(dst, stale)
        except FileNotFoundError:
            pass
        else:
            shutil.rmtree(stale, ignore_errors=True)
    os.rename(src, dst)


def read_fingerprint(model_dir: str | os.PathLike) -> dict | None:
    """The saved fingerprint of a built world teacher, or None when missing or unreadable."""
    try:
        return json.loads((Path(model_dir) / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_current(
    model_dir: str | os.PathLike, schedule: str, seed: int, tokenizer_texts: Sequence[str] | None = None
) -> bool:
    """Whether ``model_dir`` holds a world teacher built from exactly these inputs by this builder version."""
    from mmdc.world.tiny import TEACHER_SPEC, train_tokenizer

    saved = read_fingerprint(model_dir)
    if saved is None:
        return False
    tokenizer = train_tokenizer(list(default_tokenizer_texts() if tokenizer_texts is None else tokenizer_texts))
    return fingerprint_matches(saved, fingerprint(schedule, seed, tokenizer, TEACHER_SPEC))


def fingerprint_matches(saved: dict, wanted: dict) -> bool:
    """Compare as JSON stores them: a tuple in a schedule comes back from the file as a list."""
    wanted = json.loads(json.dumps(wanted))
    return all(saved.get(k) == v for k, v in wanted.items())


def ensure_world_teacher(
    models_dir: str | os.PathLike,
    schedule: str = "full",
    seed: int = 0,
    tokenizer_texts: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Path of the world teacher under ``models_dir/world_teacher/<schedule>-seed<seed>``, built if missing or stale."""
    out = Path(models_dir) / SUBDIR / f"{schedule}-seed{seed}"
    if is_current(out, schedule, seed, tokenizer_texts):
        return str(out)
    return build_world_teacher(out, seed=seed, schedule=schedule, tokenizer_texts=tokenizer_texts, log=log)


def student_with_teacher_vision(
    student_dir: str | os.PathLike, teacher_dir: str | os.PathLike, models_dir: str | os.PathLike
) -> str:
    """The tiny student with the world teacher's trained vision tower in place of its random one; built once.

    The paper's student and teacher see through the same pretrained CLIP ViT-L/14; a tiny student
    with a random, frozen tower could never learn what is in an image, whatever the teacher says.
    So the embedded default gives the student the teacher's tower (frozen, as CLIP is) and keeps its
    own smaller LM and its fresh projector, which stage 1 aligns. Both towers must have one shape.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmdc.data.answers import model_fingerprint
    from mmdc.train.assembly import save_llava

    key = hashlib.sha256(f"{model_fingerprint(str(student_dir))}:{model_fingerprint(str(teacher_dir))}".encode())
    out = Path(models_dir) / f"student-sees-{key.hexdigest()[:12]}"
    if (out / "config.json").exists():
        return str(out)
    student = LlavaForConditionalGeneration.from_pretrained(student_dir, dtype=torch.float32)
    teacher = LlavaForConditionalGeneration.from_pretrained(teacher_dir, dtype=torch.float32)
    s_vis, t_vis = student.config.vision_config.to_dict(), teacher.config.vision_config.to_dict()
    differ = sorted(
        k
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "image_size",
            "patch_size",
        )
        if s_vis.get(k) != t_vis.get(k)
    )
    if differ:
        raise ValueError(
            f"the student's vision tower ({student_dir}) and the teacher's ({teacher_dir}) differ in "
            f"{', '.join(differ)}; they must have one shape to share weights"
        )
    student.model.vision_tower.load_state_dict(teacher.model.vision_tower.state_dict())
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
    save_llava(student, AutoProcessor.from_pretrained(student_dir), tmp)
    (tmp / "vision_source.json").write_text(json.dumps({"vision_tower_from": str(teacher_dir)}, indent=2))
    try:
        tmp.rename(out)
    except OSError:  # a concurrent builder finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the model + processor to")
    parser.add_argument("--schedule", default="full", choices=sorted(SCHEDULES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="replace a schedule field for an experiment, e.g. --set vision_steps=6000 "
        "--set 'mix=[0.4,0.45,0.15]' (values as in the run's --set; recorded in the fingerprint)",
    )
    args = parser.parse_args(argv)
    try:
        schedule_with(args.schedule, args.set)
    except ValueError as exc:
        parser.error(str(exc))
    build_world_teacher(
        args.out, seed=args.seed, schedule=args.schedule, log=lambda m: print(m, flush=True), overrides=args.set
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
