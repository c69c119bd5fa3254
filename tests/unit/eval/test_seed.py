"""SEED-Bench image part: loading (image questions only, names from the file), strict parsing, metrics, CLI wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdc.eval import cli, report, seed

ASSETS = Path(__file__).parents[2] / "assets" / "eval" / "seed"
DATA = ASSETS / "SEED-Bench.json"


def test_load_keeps_image_questions_and_names_dimensions_from_file():
    items, dimensions = seed.load(DATA)
    assert [i.sample_id for i in items] == ["101", "102", "103", "104", "105"]  # video question 901 dropped
    assert dimensions == ["Scene Understanding", "Instance Attributes", "Instance Location", "Instances Counting"]
    assert items[0].image == "seed_101.png" and items[0].answer == "A" and items[0].dimension == "Scene Understanding"
    assert items[0].prompt == (
        "What is the main color of the scene?\nA. red\nB. green\nC. blue\nD. white\n"
        "Answer with the option's letter from the given choices directly."
    )


def test_dimension_names_are_not_hard_coded(tmp_path):
    raw = json.loads(DATA.read_text())
    raw["question_type"] = {f"Dim {v}": v for v in raw["question_type"].values()}
    path = tmp_path / "renamed.json"
    path.write_text(json.dumps(raw))
    _, dimensions = seed.load(path)
    assert dimensions == ["Dim 1", "Dim 3", "Dim 4", "Dim 5"]


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("A", "A"),
        (" D\n", "D"),
        ("A.", None),
        ("A. red", None),
        ("The answer is A.", None),
        ("E", None),
        ("a", None),
        ("", None),
    ],
)
def test_parse_answer_is_llava_exact_letter(reply, expected):
    assert seed.parse_answer(reply) == expected


def test_evaluate_per_dimension_and_micro_average_hand_checked():
    items, dimensions = seed.load(DATA)
    # 101 SU right; 102 IA wrong letter; 103 IA right; 104 IC failed; 105 IL right.
    metrics, samples = seed.evaluate(items, ["A", "C", "A", "one", "C"], dimensions)
    assert metrics == {
        "Scene Understanding": 100.0,
        "Instance Attributes": 50.0,
        "Instance Location": 100.0,
        "Instances Counting": 0.0,
        "Avg": 60.0,
        "n": 5,
        "correct": 3,
        "failed": 1,
    }
    assert samples[1]["parsed"] == "C" and not samples[1]["correct"] and not samples[1]["failed"]
    assert samples[3]["failed"]
    # Micro average (LLaVA's total correct / total), not the mean of the dimensions (62.5 here).
    assert metrics["Avg"] != round(sum(metrics[d] for d in dimensions) / 4, 2)


def test_load_errors_name_the_question(tmp_path):
    raw = json.loads(DATA.read_text())
    del raw["questions"][1]["choice_c"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"broken.json: question 1 \(id '102'\) lacks \['choice_c'\]"):
        seed.load(path)
    raw = json.loads(DATA.read_text())
    raw["questions"][0]["question_type_id"] = 42
    path.write_text(json.dumps(raw))
    with pytest.raises(KeyError, match="question '101' has question_type_id 42"):
        seed.load(path)
    path.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="'questions' and 'question_type'"):
        seed.load(path)


class _Scripted:
    """A stand-in generator: answers every request with the letter in ``answers`` (by call order)."""

    def __init__(self, answers: list[str]):
        self.answers = list(answers)
        self.requests: list[dict] = []

    def generate(self, requests):
        self.requests.extend(requests)
        return [{"text": self.answers.pop(0)} for _ in requests]


def test_cli_run_wires_prompts_images_seeds_and_report(tmp_path):
    args = cli.parse_args(
        [
            "--checkpoint",
            "ckpt/iter_1",
            "--benchmark",
            "seed",
            "--data",
            str(DATA),
            "--out",
            str(tmp_path),
            "--batch-size",
            "2",
        ]
    )
    gen = _Scripted(["A", "C", "A", "one", "C"])
    payload = cli.run(args, generator=gen)
    assert payload["metrics"]["Avg"] == 60.0 and payload["meta"]["temperature"] == 0.1  # paper 4.1.3
    first = gen.requests[0]
    assert first["temperature"] == 0.1 and first["seed"] == cli.row_seed(0, "seed", "101")
    image_part, text_part = first["messages"][0]["content"]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")  # default folder: <data dir>/images
    assert text_part["text"] == seed.load(DATA)[0][0].prompt
    assert len({r["seed"] for r in gen.requests}) == 5
    table = (tmp_path / report.TABLE_FILE).read_text()
    assert (
        "| Model | Scene Understanding | Instance Attributes | Instance Location | Instances Counting | Avg |" in table
    )
    assert "| iter_1 | 100.00 | 50.00 | 100.00 | 0.00 | 60.00 |" in table


def test_row_seed_is_stable_and_distinct():
    assert cli.row_seed(0, "seed", "101") == cli.row_seed(0, "seed", "101")
    assert cli.row_seed(0, "seed", "101") != cli.row_seed(1, "seed", "101")
    assert cli.row_seed(0, "seed", "101") != cli.row_seed(0, "scienceqa", "101")
