"""Writes the tiny evaluation fixtures in this folder, each in its benchmark's real file format.

    python tests/assets/eval/make_fixtures.py

The files are committed; rerun this only to change them (output is deterministic).
- scienceqa/: LLaVA's converted test file (llava_test_CQM-A.json), the official
  problems.json and pid_splits.json, images/<pid>/image.png; the train split converted
  as LLaVA's QCM-LEA file (llava_train_QCM-LEA.json), images/train/<pid>/image.png;
- seed/: SEED-Bench.json (image and video questions), images/<data_id>;
- llavabench/: questions.jsonl, answers_gpt4.jsonl, COCO-style context.jsonl, images/.
Images are 32x32 PNGs of a single coloured square: small enough to commit.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    ImageDraw.Draw(image).rectangle([8, 8, 23, 23], fill=colour)
    image.save(path, format="PNG", optimize=True)


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def scienceqa() -> None:
    d = ROOT / "scienceqa"
    # pid: (question, choices, answer index, hint, image?, subject, grade, split)
    problems = {
        "1": ("Which color is the square?", ["blue", "red"], 1, "", True, "natural science", "grade3", "test"),
        "2": (
            "Which of these states is farthest north?",
            ["Ohio", "Texas", "Florida"],
            0,
            "Look at the map of the United States.",
            False,
            "social science",
            "grade8",
            "test",
        ),
        "3": (
            "Which word would you find on a dictionary page between 'apple' and 'cat'?",
            ["bird", "dog"],
            0,
            "",
            False,
            "language science",
            "grade5",
            "test",
        ),
        "4": (
            "Which shape is shown?",
            ["circle", "triangle", "square", "star"],
            2,
            "The picture shows one shape.",
            True,
            "natural science",
            "grade10",
            "test",
        ),
        "5": ("Which is a mammal?", ["shark", "whale"], 1, "", False, "natural science", "grade4", "val"),
    }
    official, converted = {}, []
    for pid, (question, choices, answer, hint, has_image, subject, grade, split) in problems.items():
        official[pid] = {
            "question": question,
            "choices": choices,
            "answer": answer,
            "hint": hint,
            "image": "image.png" if has_image else None,
            "task": "closed choice",
            "grade": grade,
            "subject": subject,
            "topic": "fixture",
            "category": "fixture",
            "skill": "fixture",
            "lecture": "",
            "solution": "",
            "split": split,
        }
        options = "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(choices))
        human = f"Context: {hint or 'N/A'}\n{question}\n{options}"
        record = {
            "id": pid,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "ABCDE"[answer]}],
        }
        if has_image:
            record["image"] = f"{pid}/image.png"
            record["conversations"][0]["value"] = "<image>\n" + human
            _png(d / "images" / pid / "image.png", (255, 0, 0) if pid == "1" else (0, 0, 255))
        converted.append(record)
    train = scienceqa_train(d, official)
    _dump(d / "llava_test_CQM-A.json", converted)
    _dump(d / "problems.json", official)
    _dump(d / "pid_splits.json", {"train": train, "val": ["5"], "test": ["1", "2", "3", "4"]})


def scienceqa_train(d: Path, official: dict) -> list[str]:
    """The train split, converted as LLaVA's scripts/convert_sqa_to_llava.py does with prompt_format QCM-LEA.

    Human turn: "{question}\\nContext: {hint or N/A}\\nOptions: (A) .. (B) ..", plus "\\n<image>" when the problem has
    an image; gpt turn: "{lecture} {solution} The answer is X."; images in images/train/<pid>/image.png. Half of
    the problems are text-only, as in ScienceQA. Writes llava_train_QCM-LEA.json, adds the problems to ``official``.
    """
    # pid: (question, choices, answer index, hint, image colour or None, subject, grade)
    problems = {
        "11": ("Which color is the square?", ["red", "blue"], 0, "", (255, 0, 0), "natural science", "grade2"),
        "12": ("Which color is the square?", ["red", "blue"], 1, "", (0, 0, 255), "natural science", "grade2"),
        "13": ("Which is a bird?", ["robin", "trout"], 0, "", None, "natural science", "grade3"),
        "14": (
            "Which state is farthest south?",
            ["Ohio", "Texas"],
            1,
            "Look at the map.",
            None,
            "social science",
            "grade7",
        ),
        "15": ("Which color is the square?", ["green", "red"], 1, "", (255, 0, 0), "natural science", "grade1"),
        "16": ("Which word comes first in a dictionary?", ["ant", "zoo"], 0, "", None, "language science", "grade9"),
        "17": ("Which color is the square?", ["blue", "green"], 0, "", (0, 0, 255), "natural science", "grade4"),
        "18": ("Which is a fish?", ["trout", "robin"], 0, "", None, "natural science", "grade3"),
    }
    records = []
    for pid, (question, choices, answer, hint, colour, subject, grade) in problems.items():
        lecture, solution = f"A {subject} question.", f"The right choice is {choices[answer]}."
        official[pid] = {
            "question": question,
            "choices": choices,
            "answer": answer,
            "hint": hint,
            "image": "image.png" if colour else None,
            "task": "closed choice",
            "grade": grade,
            "subject": subject,
            "topic": "fixture",
            "category": "fixture",
            "skill": "fixture",
            "lecture": lecture,
            "solution": solution,
            "split": "train",
        }
        options = " ".join(f"({'ABCDE'[i]}) {c}" for i, c in enumerate(choices))
        human = f"{question}\nContext: {hint or 'N/A'}\nOptions: {options}"
        gpt = f"{lecture} {solution} The answer is {'ABCDE'[answer]}."
        if colour is None:
            records.append(
                {"id": pid, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}
            )
            continue
        _png(d / "images" / "train" / pid / "image.png", colour)
        records.append(
            {
                "id": pid,
                "image": f"{pid}/image.png",
                "conversations": [{"from": "human", "value": f"{human}\n<image>"}, {"from": "gpt", "value": gpt}],
            }
        )
    _dump(d / "llava_train_QCM-LEA.json", records)
    return list(problems)


def seed() -> None:
    d = ROOT / "seed"
    types = {
        "Scene Understanding": 1,
        "Instance Identity": 2,
        "Instance Attributes": 3,
        "Instance Location": 4,
        "Instances Counting": 5,
        "Spatial Relation": 6,
        "Instance Interaction": 7,
        "Visual Reasoning": 8,
        "Text Understanding": 9,
        "Action Recognition": 10,
        "Action Prediction": 11,
        "Procedure Understanding": 12,
    }
    colours = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255)}
    questions = []
    rows = [  # (question_id, question, choices, answer, colour, type id)
        ("101", "What is the main color of the scene?", ["red", "green", "blue", "white"], "A", "red", 1),
        ("102", "What color is the square?", ["yellow", "green", "black", "blue"], "B", "green", 3),
        ("103", "What color is the object?", ["blue", "red", "green", "gray"], "A", "blue", 3),
        ("104", "How many squares are there?", ["one", "two", "three", "four"], "A", "red", 5),
        ("105", "Where is the square?", ["left", "right", "center", "top"], "C", "green", 4),
    ]
    for qid, question, choices, answer, colour, type_id in rows:
        data_id = f"seed_{qid}.png"
        _png(d / "images" / data_id, colours[colour])
        questions.append(
            {
                "answer": answer,
                "choice_a": choices[0],
                "choice_b": choices[1],
                "choice_c": choices[2],
                "choice_d": choices[3],
                "data_id": data_id,
                "data_type": "image",
                "question": question,
                "question_id": qid,
                "question_type_id": type_id,
            }
        )
    questions.append(
        {
            "answer": "D",
            "choice_a": "run",
            "choice_b": "jump",
            "choice_c": "sit",
            "choice_d": "wave",
            "data_id": "v_0001.mp4",
            "data_type": "video",
            "question": "What does the person do?",
            "question_id": "901",
            "question_type_id": 10,
            "segment": [0, 5],
        }
    )
    _dump(d / "SEED-Bench.json", {"questions": questions, "question_type": types})


def llavabench() -> None:
    d = ROOT / "llavabench"
    questions = [
        {"question_id": 0, "image": "000000000001.png", "text": "What color is the square?", "category": "conv"},
        {"question_id": 1, "image": "000000000001.png", "text": "Describe the image in detail.", "category": "detail"},
        {
            "question_id": 2,
            "image": "000000000002.png",
            "text": "Why might someone draw a blue square?",
            "category": "complex",
        },
    ]
    answers = [
        {"question_id": 0, "text": "The square is red.", "answer_id": "ref0", "model_id": "gpt-4-0314"},
        {
            "question_id": 1,
            "text": "A red square sits in the middle of a white background.",
            "answer_id": "ref1",
            "model_id": "gpt-4-0314",
        },
        {
            "question_id": 2,
            "text": "Perhaps to illustrate a simple shape or a colour in a lesson.",
            "answer_id": "ref2",
            "model_id": "gpt-4-0314",
        },
    ]
    context = [
        {
            "id": "000000000001",
            "image": "000000000001.png",
            "captions": ["A red square on a white background.", "A small red square."],
            "instances": [{"category": "square", "bbox": [0.25, 0.25, 0.75, 0.75]}],
        },
        {
            "id": "000000000002",
            "image": "000000000002.png",
            "captions": ["A blue square."],
            "instances": [{"category": "square", "bbox": [0.25, 0.25, 0.75, 0.75]}],
        },
    ]
    _png(d / "images" / "000000000001.png", (255, 0, 0))
    _png(d / "images" / "000000000002.png", (0, 0, 255))
    _jsonl(d / "questions.jsonl", questions)
    _jsonl(d / "answers_gpt4.jsonl", answers)
    _jsonl(d / "context.jsonl", context)


if __name__ == "__main__":
    scienceqa()
    seed()
    llavabench()
    print(f"fixtures written under {ROOT}")
