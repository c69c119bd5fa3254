"""LLaVA-Bench: loading, the judge prompt, judge-reply parsing, relative scores as summarize_gpt_review, CLI wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdc.eval import cli, llavabench, report
from mmdc.roles import RefereeParseError

ASSETS = Path(__file__).parents[2] / "assets" / "eval" / "llavabench"
QUESTIONS, ANSWERS, CONTEXT = ASSETS / "questions.jsonl", ASSETS / "answers_gpt4.jsonl", ASSETS / "context.jsonl"


def test_load_joins_questions_references_and_context():
    items = llavabench.load(QUESTIONS, ANSWERS, CONTEXT)
    assert [(i.sample_id, i.category) for i in items] == [("0", "conv"), ("1", "detail"), ("2", "complex")]
    assert items[0].reference == "The square is red." and items[0].image == "000000000001.png"
    assert items[0].context == (
        "A red square on a white background.\nA small red square.\n\nsquare: [0.25, 0.25, 0.75, 0.75]"
    )
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
        ("8 7\nAssistant 1 is more accurate.", (8.0, 7.0)),
        ("8,7", (8.0, 7.0)),  # a comma reads as a space
        ("7.5 9", (7.5, 9.0)),
        ("9 0\nAssistant 2 gave no answer.", (9.0, 0.0)),  # LLaVA takes a 0 ...
        ("11 5", (11.0, 5.0)),  # ... and any other number: it does not check the 1..10 scale
        ("8 7\r\nfine", (8.0, 7.0)),  # float() ignores the "\r"
    ],
)
def test_parse_judge_reads_the_first_line_like_llava(reply, expected):
    assert llavabench.parse_judge(reply) == expected


@pytest.mark.parametrize(
    "reply",
    [
        "Assistant 1: 8\nAssistant 2: 6",
        "The scores for Assistant 1 and 2 are 9 and 3, respectively.",
        "Scores: 8 7\nBoth are fine.",
        "8, 7",  # ", " becomes two spaces: three fields for LLaVA's split(' ')
        "8 7 ",  # a trailing space: three fields
        "8\t7",  # one field
        "eight seven",
        "8\nonly one",
        "",
        None,  # LLaVA's try/except turns any error into [-1, -1] too
    ],
)
def test_parse_judge_fails_where_llava_returns_minus_one(reply):
    with pytest.raises(RefereeParseError):
        llavabench.parse_judge(reply)


def _items(categories):
    return [
        llavabench.LlavaBenchItem(
            sample_id=str(i),
            prompt=f"q{i}",
            image=f"{i}.jpg",
            category=c,
            reference=f"ref {i}",
            context=None,
            rule=llavabench.RULE_DEFAULT,
        )
        for i, c in enumerate(categories)
    ]


def test_evaluate_averages_a_zero_and_an_unparsed_reply_in_like_llava():
    items = _items(["conv", "conv", "detail", "complex", "complex"])
    replies = ["8 6\nok", "9 0\nAssistant 2 gave no answer.", "7 7", "Assistant 1: 8\nAssistant 2: 6", "10 5"]
    metrics, samples = llavabench.evaluate(items, ["a"] * 5, replies)
    # What LLaVA's summarize_gpt_review.py prints (category, relative, reference x 10, model x 10), by hand:
    # conv: (8+9)/2 = 8.5, (6+0)/2 = 3.0 -> 35.3 85.0 30.0 (the 0 counts)
    # detail: 7, 7 -> 100.0 70.0 70.0
    # complex: the unparsed reply is [-1, -1]: (-1+10)/2 = 4.5, (-1+5)/2 = 2.0 -> 44.4 45.0 20.0
    # all: 33/5 = 6.6, 17/5 = 3.4 -> 51.5 66.0 34.0
    assert {k: metrics[k] for k in ("Con", "CR", "DD", "AVG")} == {"Con": 35.3, "CR": 44.4, "DD": 100.0, "AVG": 51.5}
    assert list(metrics)[:4] == ["Con", "CR", "DD", "AVG"]  # the paper's Table 3 order
    assert metrics["details"]["conv"] == {"relative": 35.3, "reference": 85.0, "model": 30.0, "n": 2, "unparsed": 0}
    assert metrics["details"]["complex"] == {"relative": 44.4, "reference": 45.0, "model": 20.0, "n": 2, "unparsed": 1}
    assert metrics["details"]["all"] == {"relative": 51.5, "reference": 66.0, "model": 34.0, "n": 5, "unparsed": 1}
    # The unparsed reply is counted and shown, not hidden in the mean.
    assert metrics["unparsed"] == 1 and metrics["unparsed_by_column"] == {"CR": 1} and metrics["n"] == 5
    assert metrics["unparsed_readable"] == 1  # it did give scores, just not on its first line
    assert samples[3]["parsed"] is None and samples[3]["tuple"] == [-1.0, -1.0] and samples[3]["error"]
    assert samples[3]["readable_elsewhere"] == [8.0, 6.0]
    assert samples[1]["parsed"] == [9.0, 0.0] and samples[1]["model_score"] == 0.0
    assert report.table_columns(metrics) == ["Con", "CR", "DD", "AVG"]  # the counts are no columns


# LLaVA's llava/eval/eval_gpt_review_bench.py parse_score (lines 36-49) and summarize_gpt_review.py (lines 40-59,
# the branch for reviews with a category), at haotian-liu/LLaVA c121f04: verbatim but for rows instead of files
# and lines returned instead of printed.
def _llava_parse_score(review):
    try:
        score_pair = review.split("\n")[0]
        score_pair = score_pair.replace(",", " ")
        sp = score_pair.split(" ")
        if len(sp) == 2:
            return [float(sp[0]), float(sp[1])]
        else:
            return [-1, -1]
    except Exception:
        return [-1, -1]


def _llava_summarize(reviews):
    from collections import defaultdict

    import numpy as np

    scores = defaultdict(list)
    for review in reviews:
        if "category" in review:
            scores[review["category"]].append(review["tuple"])
            scores["all"].append(review["tuple"])
    lines = []
    for k, v in sorted(scores.items()):
        stats = np.asarray(v).mean(0).tolist()
        stats = [round(x, 3) for x in stats]
        lines.append(f"{k} {round(stats[1] / stats[0] * 100, 1)} {round(stats[0] * 10, 1)} {round(stats[1] * 10, 1)}")
    return lines


def test_evaluate_prints_what_llavas_summarize_gpt_review_prints():
    replies = [
        "8 7\nGood.",
        "9 0",
        "8, 7",
        "7.5 8.5\nx",
        "Assistant 1: 9\nAssistant 2: 4",
        "10 3",
        "6 6 ",
        "0 4",
        "9,8\nclose",
        "",
        "8.3 7.1",
        "7 9\r\nbetter",
        "10 10",
        "5 2",
        "9 1\nshort",
    ]
    categories = ["llava_bench_conv", "llava_bench_detail", "llava_bench_complex"] * 5  # in-the-wild review names
    items = _items(categories)
    metrics, samples = llavabench.evaluate(items, ["a"] * len(items), replies)

    reviews = [
        {"question_id": i, "category": c, "tuple": _llava_parse_score(r)}
        for i, (c, r) in enumerate(zip(categories, replies))
    ]
    assert [s["tuple"] for s in samples] == [[float(x) for x in r["tuple"]] for r in reviews]
    ours = [f"{k} {d['relative']} {d['reference']} {d['model']}" for k, d in sorted(metrics["details"].items())]
    assert ours == _llava_summarize(reviews)
    assert [k for k in metrics if k in ("Con", "CR", "DD", "AVG")] == ["Con", "CR", "DD", "AVG"]
    assert metrics["Con"] == metrics["details"]["llava_bench_conv"]["relative"]
    assert metrics["unparsed"] == sum(r["tuple"] == [-1, -1] for r in reviews) == 4


def test_categories_shown_as_table3_columns():
    assert [llavabench.column_name(c) for c in ("conv", "complex", "detail")] == ["Con", "CR", "DD"]
    assert [llavabench.column_name(c) for c in ("llava_bench_conv", "llava_bench_complex", "llava_bench_detail")] == [
        "Con",
        "CR",
        "DD",
    ]
    assert llavabench.column_name("ocr") == "ocr"  # a category the paper has not: its own name
    metrics, _ = llavabench.evaluate(_items(["ocr", "detail", "conv"]), ["a"] * 3, ["8 4"] * 3)
    assert report.table_columns(metrics) == ["Con", "DD", "ocr", "AVG"]
    with pytest.raises(ValueError, match="'conv' and 'llava_bench_conv' are both Table 3's Con"):
        llavabench.evaluate(_items(["conv", "llava_bench_conv"]), ["a"] * 2, ["8 4"] * 2)


def test_relative_score_is_none_where_llava_would_divide_by_zero():
    metrics, _ = llavabench.evaluate(_items(["conv"]), ["a"], ["0 5"])
    assert metrics["Con"] is None and metrics["details"]["conv"]["model"] == 50.0


def test_evaluate_rounds_means_before_the_ratio_like_llava():
    item = llavabench.load(QUESTIONS, ANSWERS)[0]
    replies = ["7 5", "7 5", "8 6"]
    metrics, _ = llavabench.evaluate([item] * 3, ["x"] * 3, replies)
    # means 7.333 / 5.333 (3 decimals) -> 72.7; x10 -> 73.3 and 53.3
    assert metrics["details"]["conv"] == {"relative": 72.7, "reference": 73.3, "model": 53.3, "n": 3, "unparsed": 0}


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
    args = cli.parse_args(
        [
            "--checkpoint",
            "ckpt/iter_2",
            "--benchmark",
            "llavabench",
            "--data",
            str(QUESTIONS),
            "--answers",
            str(ANSWERS),
            "--context",
            str(CONTEXT),
            "--out",
            str(tmp_path),
        ]
    )
    student = _Scripted(["It is red.", "A red square.", "For a lesson."])
    judge = _Scripted(["9 9", "8 4", "nonsense"])
    payload = cli.run(args, generator=student, judge=judge)
    assert student.requests[0]["temperature"] == 0.7  # paper 4.1.3, LLaVA test set
    judge_req = judge.requests[1]
    assert judge_req["temperature"] == cli.JUDGE_TEMPERATURE
    assert "[Assistant 2]\nA red square.\n\n[End of Assistant 2]" in judge_req["messages"][1]["content"]
    metrics = payload["metrics"]
    # "nonsense" is LLaVA's [-1, -1]: CR reads 100.0 (-1 / -1), AVG (9+4-1)/3 / (9+8-1)/3 = 4.0 / 5.333 -> 75.0.
    assert metrics["Con"] == 100.0 and metrics["DD"] == 50.0 and metrics["CR"] == 100.0 and metrics["AVG"] == 75.0
    table = (tmp_path / report.TABLE_FILE).read_text()
    assert "| Model | Con | CR | DD | AVG |" in table and "| iter_2 | 100.0 | 100.0 | 50.0 | 75.0 |" in table
    # ... which is why the table says so right under it.
    assert (
        "- unparsed: 1 (averaged in as scores (-1, -1), as LLaVA's summarize_gpt_review.py does); "
        "by column: CR 1\n- unparsed_readable: 0\n"
    ) in table
    lines = (tmp_path / report.SAMPLES_FILE).read_text().splitlines()
    assert json.loads(lines[2])["judge_reply"] == "nonsense"


def test_cli_llavabench_needs_answers_and_judge(tmp_path):
    args = cli.parse_args(
        [
            "--checkpoint",
            "c",
            "--benchmark",
            "llavabench",
            "--data",
            str(QUESTIONS),
            "--answers",
            str(ANSWERS),
            "--out",
            str(tmp_path),
        ]
    )
    with pytest.raises(SystemExit, match="needs a judge"):
        cli.run(args, generator=_Scripted([]))
    args = cli.parse_args(
        [
            "--checkpoint",
            "c",
            "--benchmark",
            "llavabench",
            "--data",
            str(QUESTIONS),
            "--judge-url",
            "http://127.0.0.1:9/v1",
            "--out",
            str(tmp_path),
        ]
    )
    with pytest.raises(SystemExit, match="needs --answers"):
        cli.run(args, generator=_Scripted([]))
