"""LLaVA-Bench: loading, the judge prompt, judge-reply parsing, relative scores as summarize_gpt_review, CLI wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdc.actors.roles import RefereeParseError
from mmdc.eval import cli, llavabench, report

ASSETS = Path(__file__).parents[2] / "assets" / "eval" / "llavabench"
QUESTIONS, ANSWERS, CONTEXT = ASSETS / "questions.jsonl", ASSETS / "answers_gpt4.jsonl", ASSETS / "context.jsonl"


def test_load_joins_questions_references_and_context():
    items = llavabench.load(QUESTIONS, ANSWERS, CONTEXT)
    assert [(i.sample_id, i.category) for i in items] == [("0", "conv"), ("1", "detail"), ("2", "complex")]
    assert items[0].reference == "The square is red." and items[0].image == "000000000001.png"
    assert items[0].context == ("A red square on a white background.\nA small red square.\n\n"
                                "square: [0.25, 0.25, 0.75, 0.75]")
    assert items[0].rule == llavabench.RULE_COCO
    bare = llavabench.load(QUESTIONS, ANSWERS)
    assert bare[0].context is None and bare[0].rule == llavabench.RULE_DEFAULT


def test_context_text_in_the_wild_caption():
    text, rule = llavabench.context_text({"image": "x.jpg", "caption": "A cat on a mat."})
    assert text == "A cat on a mat." and rule == llavabench.RULE_CAPTION
    with pytest.raises(ValueError, match="'x.jpg'"):
        llavabench.context_text({"image": "x.jpg"})


def test_judge_prompt_matches_llava_layout():
    item = llavabench.load(QUESTIONS, ANSWERS, CONTEXT)[0]
    prompt = llavabench.judge_prompt(item, "It is blue.")
    assert prompt == (
        f"[Context]\n{item.context}\n\n[Question]\nWhat color is the square?\n\n"
        "[Assistant 1]\nThe square is red.\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nIt is blue.\n\n[End of Assistant 2]\n\n"
        f"[System]\n{llavabench.RULE_COCO}\n\n"
    )
    assert "first output a single line containing only two values" in llavabench.RULE_COCO
    messages = llavabench.judge_messages(item, "It is blue.")
    assert messages[0] == {"role": "system", "content": llavabench.JUDGE_SYSTEM}
    assert messages[1]["content"] == prompt  # text only: no image part


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("8 7\nAssistant 1 is more accurate.", ((8.0, 7.0), "first_line")),
        ("8,7", ((8.0, 7.0), "first_line")),
        ("7.5 9", ((7.5, 9.0), "first_line")),
        ("Assistant 1: 8\nAssistant 2: 6", ((8.0, 6.0), "fallback")),
        ("Scores: 8 7\nBoth are fine.", ((8.0, 7.0), "fallback")),
        ("The scores for Assistant 1 and 2 are 9 and 3, respectively.", ((9.0, 3.0), "fallback")),
    ],
)
def test_parse_judge_readable(reply, expected):
    assert llavabench.parse_judge(reply) == expected


@pytest.mark.parametrize("reply", ["0 7\nbad", "11 5", "Both answers are good.", "", "8\nonly one"])
def test_parse_judge_unreadable_raises(reply):
    with pytest.raises(RefereeParseError):
        llavabench.parse_judge(reply)


def test_evaluate_relative_scores_hand_checked():
    items = llavabench.load(QUESTIONS, ANSWERS, CONTEXT)
    replies = ["8 6\nok", "The scores for Assistant 1 and 2 are 9 and 3, respectively.", "I cannot judge this."]
    metrics, samples = llavabench.evaluate(items, ["red", "a square", "art"], replies)
    # conv 6/8 = 75.0; detail 3/9 = 33.3; complex unparsed -> no score; all (6+3)/2 / (8+9)/2 = 4.5/8.5 = 52.9.
    assert {k: metrics[k] for k in ("Con", "CR", "DD", "AVG")} == {"Con": 75.0, "CR": None, "DD": 33.3, "AVG": 52.9}
    assert list(metrics)[:4] == ["Con", "CR", "DD", "AVG"]  # the paper's Table 3 order
    assert metrics["details"]["all"] == {"relative": 52.9, "reference": 85.0, "model": 45.0, "n": 2}
    assert metrics["details"]["conv"] == {"relative": 75.0, "reference": 80.0, "model": 60.0, "n": 1}
    assert metrics["unparsed"] == 1 and metrics["n"] == 3 and metrics["fallback"] == 1
    assert samples[2]["parsed"] is None and samples[2]["error"] == "no score found"
    assert samples[1]["parse"] == "fallback" and samples[0]["model_score"] == 6.0


def test_evaluate_rounds_means_before_the_ratio_like_llava():
    item = llavabench.load(QUESTIONS, ANSWERS)[0]
    replies = ["7 5", "7 5", "8 6"]
    metrics, _ = llavabench.evaluate([item] * 3, ["x"] * 3, replies)
    # means 7.333 / 5.333 (3 decimals) -> 72.7; x10 -> 73.3 and 53.3
    assert metrics["details"]["conv"] == {"relative": 72.7, "reference": 73.3, "model": 53.3, "n": 3}


def test_load_errors_name_the_question(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question_id": 0, "text": "red"}) + "\n")
    with pytest.raises(KeyError, match="no reference answer for question_id 1"):
        llavabench.load(QUESTIONS, answers)
    context = tmp_path / "context.jsonl"
    context.write_text(json.dumps({"image": "other.png", "caption": "x"}) + "\n")
    with pytest.raises(KeyError, match="no context for image '000000000001.png' \\(question_id 0\\)"):
        llavabench.load(QUESTIONS, ANSWERS, context)
    broken = tmp_path / "questions.jsonl"
    broken.write_text('{"question_id": 0, "image": "a.png"}\n{oops\n')
    with pytest.raises(ValueError, match="questions.jsonl:2: not valid JSON"):
        llavabench.load(broken, ANSWERS)


class _Scripted:
    def __init__(self, texts):
        self.texts, self.requests = list(texts), []

    def generate(self, requests):
        self.requests.extend(requests)
        return [{"text": self.texts.pop(0)} for _ in requests]


def test_cli_run_student_then_judge(tmp_path):
    args = cli.parse_args(["--checkpoint", "ckpt/iter_2", "--benchmark", "llavabench", "--data", str(QUESTIONS),
                           "--answers", str(ANSWERS), "--context", str(CONTEXT), "--out", str(tmp_path)])
    student = _Scripted(["It is red.", "A red square.", "For a lesson."])
    judge = _Scripted(["9 9", "8 4", "nonsense"])
    payload = cli.run(args, generator=student, judge=judge)
    assert student.requests[0]["temperature"] == 0.7  # paper 4.1.3, LLaVA test set
    judge_req = judge.requests[1]
    assert judge_req["temperature"] == cli.JUDGE_TEMPERATURE
    assert "[Assistant 2]\nA red square.\n\n[End of Assistant 2]" in judge_req["messages"][1]["content"]
    metrics = payload["metrics"]
    assert metrics["Con"] == 100.0 and metrics["DD"] == 50.0 and metrics["CR"] is None and metrics["unparsed"] == 1
    assert metrics["AVG"] == round(6.5 / 8.5 * 100, 1)
    table = (tmp_path / report.TABLE_FILE).read_text()
    assert "| Model | Con | CR | DD | AVG |" in table and "| iter_2 | 100.0 | - | 50.0 | 76.5 |" in table
    assert "unparsed: 1, fallback: 0" in table
    lines = (tmp_path / report.SAMPLES_FILE).read_text().splitlines()
    assert json.loads(lines[2])["judge_reply"] == "nonsense"


def test_cli_llavabench_needs_answers_and_judge(tmp_path):
    args = cli.parse_args(["--checkpoint", "c", "--benchmark", "llavabench", "--data", str(QUESTIONS),
                           "--answers", str(ANSWERS), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs a judge"):
        cli.run(args, generator=_Scripted([]))
    args = cli.parse_args(["--checkpoint", "c", "--benchmark", "llavabench", "--data", str(QUESTIONS),
                           "--judge-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs --answers"):
        cli.run(args, generator=_Scripted([]))
