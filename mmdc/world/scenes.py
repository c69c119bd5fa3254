"""A deterministic synthetic visual world with ground truth: the embedded default data set.

Coloured shapes on a plain background, questions about them in six families of
graded difficulty, and a checker that knows the true answer. It exists so the
whole pipeline (teach, tune, assess, augment, evaluate) runs on a laptop in
minutes with a tiny teacher that can actually be trained to be right, and so
that answers to *generated* questions can be graded: ``parse_question``
recovers the family and slots from any template's text, ``answer`` states the
truth and ``check_answer`` judges free text against it.

Every family has several paraphrase templates that share few words, so two
questions about one image can pass the augmentor's ROUGE-L < 0.7 novelty test.

Writes (``generate_world``)::

    <out>/images/<image_id>.png   rendered scenes (train and test)
    <out>/instructions.json       LLaVA-Instruct format, train images
    <out>/test.json               same format plus "family" on each human turn, held-out images
    <out>/scenes.jsonl            ground truth, one scene per line
    <out>/captions.json           stage-1 caption pairs [{"id", "image", "caption"}]
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (225, 185, 0),
    "purple": (140, 50, 180),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (185, 185, 185), "beige": (240, 228, 200)}
SIZES = ("small", "large")
RELATIONS = ("left", "right", "above", "below")
FAMILIES = ("exist", "color", "count", "spatial", "compare", "describe")
# Rough difficulty for a student: 1 = read one attribute, 4 = compose everything in the scene.
FAMILY_DIFFICULTY = {"exist": 1, "color": 1, "count": 2, "spatial": 3, "compare": 3, "describe": 4}

# Object radius as a fraction of the image side; a large object is ~2x a small one.
_RADIUS = {"small": 0.09, "large": 0.17}
_REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    """One shape; ``x``, ``y`` are its centre in pixels (y grows downwards, as in the image)."""

    shape: str
    color: str
    size: str
    x: int
    y: int


@dataclass
class Scene:
    """Ground truth of one image. Each shape occurs at most once, so "the circle" is never ambiguous."""

    image_id: str
    objects: list[SceneObject]
    background: str
    image_size: int = 64
    split: str = "train"

    def find(self, shape: str) -> SceneObject | None:
        """The object with this shape, or None."""
        return next((obj for obj in self.objects if obj.shape == shape), None)

    def holds(self, a: str, relation: str, b: str) -> bool:
        """Whether shape ``a`` is ``relation`` (left/right/above/below) shape ``b``; both must be present."""
        obj_a, obj_b = self.find(a), self.find(b)
        if obj_a is None or obj_b is None:
            raise KeyError(f"scene {self.image_id}: needs both {a} and {b}")
        return {
            "left": obj_a.x < obj_b.x,
            "right": obj_a.x > obj_b.x,
            "above": obj_a.y < obj_b.y,
            "below": obj_a.y > obj_b.y,
        }[relation]

    def relations(self) -> list[tuple[str, str, str]]:
        """Every true (a, relation, b) triple between two objects of the scene."""
        return [
            (a.shape, rel, b.shape)
            for a in self.objects
            for b in self.objects
            if a is not b
            for rel in RELATIONS
            if self.holds(a.shape, rel, b.shape)
        ]

    def to_dict(self) -> dict:
        """JSON-ready form (the scenes.jsonl line)."""
        return {
            "image_id": self.image_id,
            "split": self.split,
            "image_size": self.image_size,
            "background": self.background,
            "objects": [asdict(obj) for obj in self.objects],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        """Inverse of ``to_dict``."""
        return cls(
            image_id=data["image_id"],
            objects=[SceneObject(**obj) for obj in data["objects"]],
            background=data["background"],
            image_size=int(data.get("image_size", 64)),
            split=data.get("split", "train"),
        )


def radius(size: str, image_size: int) -> int:
    """Pixel radius of an object of ``size`` in an ``image_size`` square image."""
    return max(2, round(_RADIUS[size] * image_size))


def random_scene(image_id: str, rng: random.Random, image_size: int = 64, split: str = "train") -> Scene:
    """Draw 1-3 non-overlapping objects with distinct shapes.

    Centres of any two objects differ by at least 10% of the image side in both
    x and y, so every left/right/above/below relation is visible, not a pixel call.
    """
    margin = max(2, round(0.1 * image_size))
    for _ in range(200):
        count = rng.randint(1, 3)
        shapes = rng.sample(SHAPES, count)
        placed: list[SceneObject] = []
        for shape in shapes:
            size = rng.choice(SIZES)
            r = radius(size, image_size)
            for _ in range(100):
                x = rng.randint(r + 1, image_size - r - 2)
                y = rng.randint(r + 1, image_size - r - 2)
                if all(
                    abs(x - o.x) >= margin
                    and abs(y - o.y) >= margin
                    and (x - o.x) ** 2 + (y - o.y) ** 2 >= (r + radius(o.size, image_size) + 2) ** 2
                    for o in placed
                ):
                    placed.append(SceneObject(shape, rng.choice(tuple(COLORS)), size, x, y))
                    break
        if len(placed) == count:
            return Scene(image_id, placed, rng.choice(tuple(BACKGROUNDS)), image_size, split)
    raise RuntimeError(f"could not place objects for {image_id} at image_size={image_size}")


def render(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image of ``scene.image_size`` pixels square."""
    side = scene.image_size
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        r = radius(obj.size, side)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((obj.x - r, obj.y - r, obj.x + r, obj.y + r), fill=fill)
        elif obj.shape == "square":
            half = round(r * 0.85)  # same visual area as the circle, roughly
            draw.rectangle((obj.x - half, obj.y - half, obj.x + half, obj.y + half), fill=fill)
        else:  # triangle, pointing up, inscribed in the object's circle
            draw.polygon(
                [(obj.x, obj.y - r), (obj.x - r, obj.y + round(0.8 * r)), (obj.x + r, obj.y + round(0.8 * r))],
                fill=fill,
            )
    return image


def describe(scene: Scene) -> str:
    """The canonical one-sentence description: objects left to right, then the background."""
    parts = [f"a {o.size} {o.color} {o.shape}" for o in sorted(scene.objects, key=lambda o: o.x)]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed[0].upper()}{listed[1:]} on a {scene.background} background."


# ----------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class QuestionSpec:
    """What a question asks, independent of wording. Unused slots are None."""

    family: str
    shape: str | None = None
    color: str | None = None
    other: str | None = None  # the second shape (spatial, compare)
    relation: str | None = None  # left / right / above / below (spatial)


# Templates per family, lower case; "{slot}" marks a slot. The text is the question
# after normalisation (see _normalize): no trailing punctuation, single spaces.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "exist": (
        "is there a {color} {shape} in the image",
        "does the picture contain a {color} {shape}",
        "can you see any {color} {shape} here",
        "would you find a {color} {shape} somewhere in this scene",
    ),
    "color": (
        "what color is the {shape}",
        "which color does the {shape} have",
        "tell me the color of the {shape}",
        "the {shape} in this picture is painted in what color",
    ),
    "count": (
        "how many shapes are in the image",
        "count the objects you can see",
        "what is the number of shapes shown here",
        "how many {color} shapes are in the image",
        "count the {color} objects you can see",
        "what is the number of {color} shapes shown here",
    ),
    "spatial": (
        "is the {shape} {relation} the {other}",
        "take the {other} as reference: is the {shape} {relation} it",
        "compared with the {other}, does the {shape} appear {relation} that object",
        "considering the {shape} and the {other}, is the former {relation} the latter",
    ),
    "compare": (
        "which shape is larger, the {shape} or the {other}",
        "between the {shape} and the {other}, which one is bigger",
        "is the {shape} or the {other} the bigger object",
        "of the {shape} and the {other}, which takes up more space",
    ),
    "describe": (
        "describe the image briefly",
        "what do you see in this picture",
        "give a short description of the scene",
        "summarize what is shown here in one sentence",
    ),
}

_SLOT_PATTERNS = {
    "shape": "(?P<shape>" + "|".join(SHAPES) + ")",
    "other": "(?P<other>" + "|".join(SHAPES) + ")",
    "color": "(?P<color>" + "|".join(COLORS) + ")",
    "relation": "(?P<relation>" + "|".join(re.escape(p) for p in _REL_PHRASE.values()) + ")",
}
_PHRASE_TO_RELATION = {phrase: rel for rel, phrase in _REL_PHRASE.items()}


def _compile(template: str) -> re.Pattern:
    """Turn a template into a full-match regex with one named group per slot."""
    pieces = re.split(r"(\{\w+\})", template)
    # Commas and colons in a template are optional in the text ("take the square as reference is ..." parses).
    pattern = "".join(
        _SLOT_PATTERNS[p[1:-1]] if p.startswith("{") else re.escape(p).replace(",", ",?").replace(":", ":?")
        for p in pieces
    )
    return re.compile(pattern)


_COMPILED = [
    (family, template, _compile(template)) for family, templates in TEMPLATES.items() for template in templates
]


def _normalize(text: str) -> str:
    """Lower case, drop <image>, unify spelling, collapse whitespace, strip surrounding punctuation."""
    text = text.replace("<image>", " ").lower()
    text = re.sub(r"\bcolour", "color", text)
    text = re.sub(r"\bgrey\b", "gray", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r" ([,:;])", r"\1", text)
    return text.strip().strip(" ?.!\"'").strip()


def parse_question(text: str) -> QuestionSpec | None:
    """Recover the family and slots of a question written with any template, or None if it matches none.

    Lenient about case, punctuation, whitespace, an <image> placeholder and
    British spelling; exact about the words otherwise. Questions about two
    slots naming the same shape ("the circle or the circle") are rejected.
    """
    norm = _normalize(text)
    for family, _template, regex in _COMPILED:
        match = regex.fullmatch(norm)
        if match is None:
            continue
        slots = match.groupdict()
        if "relation" in slots:
            slots["relation"] = _PHRASE_TO_RELATION[slots["relation"]]
        if slots.get("other") is not None and slots.get("other") == slots.get("shape"):
            return None
        return QuestionSpec(family=family, **slots)
    return None


def templates_for(spec: QuestionSpec) -> list[str]:
    """The templates of ``spec.family`` whose slots are exactly the ones ``spec`` fills."""
    return [t for t in TEMPLATES[spec.family] if _template_fits(t, spec)]


def render_question(spec: QuestionSpec, template_index: int) -> str:
    """The question text for ``spec`` in template ``template_index`` of ``templates_for(spec)`` (capitalised)."""
    candidates = templates_for(spec)
    if not candidates:
        raise ValueError(f"no {spec.family} template fits {spec}")
    if not 0 <= template_index < len(candidates):
        raise IndexError(f"template_index {template_index} out of range: {len(candidates)} templates fit {spec}")
    template = candidates[template_index]
    text = template.format(
        shape=spec.shape, color=spec.color, other=spec.other, relation=_REL_PHRASE.get(spec.relation or "", "")
    )
    end = "." if text.split()[0] in ("describe", "tell", "count", "give", "summarize") else "?"
    return text[0].upper() + text[1:] + end


def _template_fits(template: str, spec: QuestionSpec) -> bool:
    """A template fits when it has exactly the slots the spec fills (count has a colour and a colourless form)."""
    slots = set(re.findall(r"\{(\w+)\}", template))
    filled = {name for name in ("shape", "color", "other", "relation") if getattr(spec, name) is not None}
    return slots == filled


def families_for(scene: Scene) -> list[str]:
    """Families that can ask a meaningful question about ``scene`` (two-object families need two objects)."""
    if len(scene.objects) >= 2:
        return list(FAMILIES)
    return [f for f in FAMILIES if f not in ("spatial", "compare")]


def random_spec(scene: Scene, family: str, rng: random.Random) -> QuestionSpec:
    """A question spec of ``family`` valid for ``scene`` (asks only about shapes present, where it names one)."""
    shapes = [o.shape for o in scene.objects]
    if family == "exist":
        if rng.random() < 0.5:
            obj = rng.choice(scene.objects)
            return QuestionSpec("exist", shape=obj.shape, color=obj.color)
        present = {(o.shape, o.color) for o in scene.objects}
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
        shape, color = rng.choice(absent)
        return QuestionSpec("exist", shape=shape, color=color)
    if family == "color":
        return QuestionSpec("color", shape=rng.choice(shapes))
    if family == "count":
        roll = rng.random()
        if roll < 0.4:
            return QuestionSpec("count")
        color = rng.choice(scene.objects).color if roll < 0.8 else rng.choice(tuple(COLORS))
        return QuestionSpec("count", color=color)
    if family in ("spatial", "compare"):
        if len(shapes) < 2:
            raise ValueError(f"scene {scene.image_id}: a {family} question needs two objects, it has {len(shapes)}")
        a, b = rng.sample(shapes, 2)
        if family == "spatial":
            return QuestionSpec("spatial", shape=a, other=b, relation=rng.choice(RELATIONS))
        return QuestionSpec("compare", shape=a, other=b)
    if family == "describe":
        return QuestionSpec("describe")
    raise ValueError(f"unknown question family {family!r}; families are {FAMILIES}")


def random_question(scene: Scene, family: str, rng: random.Random) -> tuple[str, QuestionSpec]:
    """A random question of ``family`` valid for ``scene``, in a random template: (text, spec)."""
    spec = random_spec(scene, family, rng)
    return render_question(spec, rng.randrange(len(templates_for(spec)))), spec


# ----------------------------------------------------------------------------- answers


def _missing(scene: Scene, spec: QuestionSpec) -> str | None:
    """The first shape the question names that is not in the scene (exist questions name none by design)."""
    if spec.family in ("color", "spatial", "compare"):
        for shape in (spec.shape, spec.other):
            if shape is not None and scene.find(shape) is None:
                return shape
    return None


def _count(scene: Scene, color: str | None) -> int:
    return sum(1 for o in scene.objects if color is None or o.color == color)


def answer(scene: Scene, spec: QuestionSpec) -> str:
    """The canonical truthful answer to ``spec`` about ``scene``."""
    missing = _missing(scene, spec)
    if missing is not None:
        return f"There is no {missing} in the image."
    if spec.family == "exist":
        found = any(o.shape == spec.shape and o.color == spec.color for o in scene.objects)
        return "Yes." if found else "No."
    if spec.family == "color":
        return f"The {spec.shape} is {scene.find(spec.shape).color}."
    if spec.family == "count":
        n = _count(scene, spec.color)
        noun = f"{spec.color} shape" if spec.color else "shape"
        if n == 0:
            return f"There are no {noun}s."
        return f"There is 1 {noun}." if n == 1 else f"There are {n} {noun}s."
    if spec.family == "spatial":
        if scene.holds(spec.shape, spec.relation, spec.other):
            return f"Yes, the {spec.shape} is {_REL_PHRASE[spec.relation]} the {spec.other}."
        return f"No, the {spec.shape} is {_REL_PHRASE[_OPPOSITE[spec.relation]]} the {spec.other}."
    if spec.family == "compare":
        a, b = scene.find(spec.shape), scene.find(spec.other)
        if a.size == b.size:
            return f"The {a.shape} and the {b.shape} are the same size."
        larger, smaller = (a, b) if a.size == "large" else (b, a)
        return f"The {larger.shape} is larger than the {smaller.shape}."
    if spec.family == "describe":
        return describe(scene)
    raise ValueError(f"unknown question family {spec.family!r}")


def _words(text: str) -> list[str]:
    """Lower-case word tokens with American spelling (the unit every checker reads)."""
    text = re.sub(r"\bcolour", "color", text.lower())
    text = re.sub(r"\bgrey\b", "gray", text)
    return re.findall(r"[a-z]+|\d+", text)


def _first_yes_no(words: list[str]) -> str | None:
    return next((w for w in words if w in ("yes", "no")), None)


# "t" is what "isn't", "can't", "doesn't" leave after tokenising.
_NEGATIONS = {"no", "not", "none", "nothing", "absent", "cannot", "t"}
# Words that claim something about a shape's place or size: wrong when the shape is not there.
_CLAIMS = {"left", "right", "above", "below", "larger", "bigger", "smaller", "greater", "same", "yes"}


def check_answer(scene: Scene, spec: QuestionSpec, text: str) -> bool:
    """Judge a free-text answer: lenient about case, punctuation and phrasing, strict about the fact.

    - exist / spatial: the first yes/no word decides;
    - color: the right colour is named and no other colour;
    - count: the first number (digits, number words, "no"/"none") equals the truth;
    - compare: the shape claimed larger (or "same size") matches;
    - describe: exactly the scene's (colour, shape) pairs are mentioned, sizes right where given;
    - a question about an absent shape: the answer says it is not there and claims no attribute.
    """
    if not isinstance(text, str) or not text.strip():
        return False
    words = _words(text)
    missing = _missing(scene, spec)
    if missing is not None:
        return bool(_NEGATIONS & set(words)) and not (set(words) & (_CLAIMS | set(COLORS)))
    if spec.family in ("exist", "spatial"):
        truth = answer(scene, spec).split(",")[0].rstrip(".").lower()  # "yes" / "no"
        return _first_yes_no(words) == truth
    if spec.family == "color":
        named = {w for w in words if w in COLORS}
        return named == {scene.find(spec.shape).color}
    if spec.family == "count":
        truth = _count(scene, spec.color)
        # A real number wins over "no"/"none": "No, there are 2" claims 2.
        numbers = [int(w) if w.isdigit() else _NUMBER_WORDS[w] for w in words if w.isdigit() or w in _NUMBER_WORDS]
        if numbers:
            return numbers[0] == truth
        return truth == 0 and bool({"no", "none"} & set(words))
    if spec.family == "compare":
        return _claimed_larger(words, spec) == _true_larger(scene, spec)
    if spec.family == "describe":
        return _check_description(scene, words)
    raise ValueError(f"unknown question family {spec.family!r}")


def _true_larger(scene: Scene, spec: QuestionSpec) -> str:
    """ "same" or the shape that is larger."""
    a, b = scene.find(spec.shape), scene.find(spec.other)
    if a.size == b.size:
        return "same"
    return a.shape if a.size == "large" else b.shape


def _claimed_larger(words: list[str], spec: QuestionSpec) -> str | None:
    """What an answer claims: "same", one of the two shapes, or None when it does not commit."""
    if "same" in words or "equal" in words or "equally" in words:
        return "same"
    joined = " ".join(words)
    match = re.search(r"\b(circle|square|triangle) is (?:the )?(larger|bigger|greater|smaller)\b", joined)
    if match:
        shape, word = match.groups()
        if shape not in (spec.shape, spec.other):
            return None
        if word == "smaller":
            return spec.other if shape == spec.shape else spec.shape
        return shape
    mentioned = [w for w in words if w in (spec.shape, spec.other)]
    if len(set(mentioned)) == 1 and "smaller" not in words:  # "The circle." / "The circle is."
        return mentioned[0]
    return None


def _check_description(scene: Scene, words: list[str]) -> bool:
    """Exactly the scene's (colour, shape) pairs are mentioned; a size, if given right before, is right."""
    truth = {(o.color, o.shape): o.size for o in scene.objects}
    seen: set[tuple[str, str]] = set()
    for i in range(1, len(words)):
        if words[i] in SHAPES and words[i - 1] in COLORS:
            pair = (words[i - 1], words[i])
            if pair not in truth:
                return False
            if i >= 2 and words[i - 2] in SIZES and words[i - 2] != truth[pair]:
                return False
            seen.add(pair)
    return seen == set(truth)


def grade(scene: Scene, question: str, reply: str) -> bool | None:
    """Grade ``reply`` to the free-text ``question``; None when the question is not one the world can parse."""
    spec = parse_question(question)
    return None if spec is None else check_answer(scene, spec, reply)


# ----------------------------------------------------------------------------- files


@dataclass(frozen=True)
class WorldFiles:
    """Where ``generate_world`` wrote everything."""

    root: Path
    images_dir: Path
    instructions: Path
    test: Path
    scenes: Path
    captions: Path
    num_train: int = 0
    num_test: int = 0

    @property
    def images(self) -> Path:
        """Alias of ``images_dir``: the folder that the records' "image" fields are relative to."""
        return self.images_dir


_CAPTION_TEMPLATES = (
    "{description}",
    "A picture of {listed} on a {background} background.",
    "An image showing {listed}.",
)


def _caption(scene: Scene, rng: random.Random) -> str:
    """A stage-1 style caption: the description, or a shorter variant (noun phrases recur across images)."""
    parts = [f"a {o.color} {o.shape}" for o in sorted(scene.objects, key=lambda o: o.x)]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    template = rng.choice(_CAPTION_TEMPLATES)
    return template.format(description=describe(scene), listed=listed, background=scene.background)


def _questions_for(scene: Scene, n: int, rng: random.Random) -> list[tuple[str, QuestionSpec]]:
    """``n`` questions with families mixed (each family once before any repeats) and no repeated spec."""
    families = families_for(scene)
    rng.shuffle(families)
    out: list[tuple[str, QuestionSpec]] = []
    seen: set[QuestionSpec] = set()
    attempts = 0
    while len(out) < n and attempts < 50 * max(1, n):
        family = families[attempts % len(families)]
        attempts += 1
        text, spec = random_question(scene, family, rng)
        if spec in seen:
            continue
        seen.add(spec)
        out.append((text, spec))
    return out


def _record(scene: Scene, questions: list[tuple[str, QuestionSpec]], rng: random.Random, with_family: bool) -> dict:
    """One LLaVA-Instruct record; <image> goes before or after the first question at random."""
    conversations = []
    for turn, (text, spec) in enumerate(questions):
        value = text
        if turn == 0:
            value = f"<image>\n{text}" if rng.random() < 0.5 else f"{text}\n<image>"
        human = {"from": "human", "value": value}
        if with_family:
            human["family"] = spec.family
        conversations.append(human)
        conversations.append({"from": "gpt", "value": answer(scene, spec)})
    return {"id": scene.image_id, "image": f"{scene.image_id}.png", "conversations": conversations}


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def generate_world(
    out_dir: str | Path,
    num_images: int,
    questions_per_image: int,
    seed: int,
    image_size: int = 64,
    test_images: int = 0,
) -> WorldFiles:
    """Write a world of ``num_images`` training and ``test_images`` held-out images with questions and truth.

    Deterministic: the same arguments give byte-identical files (PNG written
    without timestamps or other metadata). Train and test images are drawn from
    separate random streams, so changing ``test_images`` does not change the train set.
    """
    if num_images < 0 or test_images < 0:
        raise ValueError(f"num_images and test_images must be >= 0, got {num_images}, {test_images}")
    if questions_per_image < 1:
        raise ValueError(f"questions_per_image must be >= 1, got {questions_per_image}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 so shapes stay recognisable, got {image_size}")
    root = Path(out_dir)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    train_rng = random.Random(f"mmdc-world:{seed}:train")
    test_rng = random.Random(f"mmdc-world:{seed}:test")
    records, test_records, captions, scene_lines = [], [], [], []
    for split, count, rng, prefix in (("train", num_images, train_rng, "img"), ("test", test_images, test_rng, "test")):
        for index in range(count):
            scene = random_scene(f"{prefix}_{index:06d}", rng, image_size, split)
            render(scene).save(images_dir / f"{scene.image_id}.png", format="PNG", optimize=False)
            questions = _questions_for(scene, questions_per_image, rng)
            record = _record(scene, questions, rng, with_family=(split == "test"))
            (records if split == "train" else test_records).append(record)
            if split == "train":
                captions.append(
                    {"id": scene.image_id, "image": f"{scene.image_id}.png", "caption": _caption(scene, rng)}
                )
            scene_lines.append(json.dumps(scene.to_dict(), sort_keys=True))

    files = WorldFiles(
        root=root,
        images_dir=images_dir,
        instructions=root / "instructions.json",
        test=root / "test.json",
        scenes=root / "scenes.jsonl",
        captions=root / "captions.json",
        num_train=num_images,
        num_test=test_images,
    )
    _write_json(files.instructions, records)
    _write_json(files.test, test_records)
    _write_json(files.captions, captions)
    files.scenes.write_text("".join(line + "\n" for line in scene_lines), encoding="utf-8")
    return files


def load_scenes(path: str | Path) -> dict[str, Scene]:
    """Read scenes.jsonl into {image_id: Scene}; a bad line raises ValueError naming the file and line."""
    scenes: dict[str, Scene] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            scene = Scene.from_dict(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a scene record: {err}") from err
        scenes[scene.image_id] = scene
    return scenes


def world_corpus(num_scenes: int = 300, seed: int = 0) -> list[str]:
    """Representative texts for training a BPE tokenizer: every template with every slot filling, every
    answer form, and descriptions / captions of ``num_scenes`` random scenes. Deterministic."""
    texts: list[str] = []
    for family in FAMILIES:
        for spec in _all_specs(family):
            texts.extend(render_question(spec, index) for index in range(len(templates_for(spec))))
    rng = random.Random(f"mmdc-world-corpus:{seed}")
    for i in range(num_scenes):
        scene = random_scene(f"corpus_{i}", rng)
        texts.append(describe(scene))
        texts.append(_caption(scene, rng))
        for family in families_for(scene):
            texts.append(answer(scene, random_spec(scene, family, rng)))
    texts.extend(f"There is no {shape} in the image." for shape in SHAPES)
    # De-duplicate, keeping first-seen order so the corpus is stable.
    return list(dict.fromkeys(texts))


def _all_specs(family: str) -> Iterable[QuestionSpec]:
    """Every spec of ``family`` (used for the tokenizer corpus and the round-trip test)."""
    if family == "exist":
        return [QuestionSpec("exist", shape=s, color=c) for s in SHAPES for c in COLORS]
    if family == "color":
        return [QuestionSpec("color", shape=s) for s in SHAPES]
    if family == "count":
        return [QuestionSpec("count")] + [QuestionSpec("count", color=c) for c in COLORS]
    if family == "spatial":
        return [
            QuestionSpec("spatial", shape=a, other=b, relation=r)
            for a in SHAPES
            for b in SHAPES
            if a != b
            for r in RELATIONS
        ]
    if family == "compare":
        return [QuestionSpec("compare", shape=a, other=b) for a in SHAPES for b in SHAPES if a != b]
    if family == "describe":
        return [QuestionSpec("describe")]
    raise ValueError(f"unknown question family {family!r}")


def all_specs(family: str) -> list[QuestionSpec]:
    """Every distinct question spec of ``family`` (all slot fillings)."""
    return list(_all_specs(family))
