"""ScienceQA: LLaVA's answer rules, loading the converted + official files, Table 1 metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mmdc.eval import scienceqa
from mmdc.eval.scienceqa import ANSWER_SUFFIX, parse_answer

ASSETS = Path(__file__).parents[2] / "assets" / "eval" / "scienceqa"
DATA = ASSETS / "llava_test_CQM-A.json"
PROBLEMS = ASSETS / "problems.json"
SPLITS = ASSETS / "pid_splits.json"


@pytest.mark.parametrize(
    "reply, n_choices, expected",
    [
        ("B", 2, "B"),
        ("  C\n", 3, "C"),  # replies are stripped (LLaVA strips the decoded output)
        ("A. Ohio", 3, "A"),
        ("The answer is B.", 2, "B"),
        ("Because of the map, the answer is A. Ohio is north.", 3, None),  # no capital "The answer is"
        ("I think... The answer is C, since", 4, "C"),  # "." in LLaVA's regex is any character
        ("The answer is B", 2, None),  # ...but it must be there: nothing after the letter fails
        ("The answer is A. The answer is B.", 2, None),  # two matches: ambiguous
        ("A.", 2, None),  # "X. " needs the space and at least one more character
        ("E", 4, None),  # a letter beyond this question's choices
        ("C. dog", 2, None),
        ("a", 2, None),  # lower case is not an option
        ("", 2, None),
        ("Answer: B", 2, None),
    ],
)
def test_parse_answer_follows_llava_rules(reply, n_choices, expected):
    assert parse_answer(reply, n_choices) == expected


# LLaVA's llava/eval/eval_science_qa.py (get_pred_idx, lines 28-36; the answer rules, lines 65-77) at
# haotian-liu/LLaVA c121f04, verbatim but for a function; its input is model_vqa_science.py's stripped output.
def _llava_pred_idx(pred_text, choices, options=("A", "B", "C", "D", "E")):
    options = list(options)
    if pred_text in options:
        answer = pred_text
    elif len(pred_text) >= 3 and pred_text[0] in options and pred_text[1:3] == ". ":
        answer = pred_text[0]
    else:
        pattern = re.compile(r"The answer is ([A-Z]).")
        res = pattern.findall(pred_text)
        if len(res) == 1:
            answer = res[0]  # 'A', 'B', ...
        else:
            answer = "FAILED"
    if answer in options[: len(choices)]:
        return options.index(answer)
    else:
        return -1


@pytest.mark.parametrize("n_choices", [2, 3, 4, 5])
def test_parse_answer_picks_what_llava_picks(n_choices):
    replies = [
        "A",
        "B",
        "C",
        "D",
        "E",
        "F",
        " B \n",
        "A. x",
        "E. x",
        "F. x",
        "B.",
        "B.x",
        "The answer is C.",
        "The answer is D!",
        "The answer is E",
        "The answer is Z.",
        "so The answer is B. or The answer is A.",
        "The answer is A. The answer is A.",
        "a",
        "",
        "FAILED",
        "Answer: B",
        "(B)",
        "B) x",
        "B. The answer is C.",
    ]
    for reply in replies:
        parsed = parse_answer(reply, n_choices)
        ours = scienceqa.OPTIONS.index(parsed) if parsed is not None else -1
        assert ours == _llava_pred_idx(reply.strip(), [None] * n_choices), reply


def test_parse_answer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_choices"):
        parse_answer("A", 6)
    with pytest.raises(TypeError):
        parse_answer(None, 2)  # type: ignore[arg-type]


def test_build_prompt_removes_image_token_and_appends_instruction():
    assert (
        scienceqa.build_prompt("<image>\nContext: N/A\nQ?\nA. x\nB. y")
        == f"Context: N/A\nQ?\nA. x\nB. y\n{ANSWER_SUFFIX}"
    )


def test_load_with_official_metadata_keeps_test_split():
    items = scienceqa.load(DATA, problems=PROBLEMS, pid_splits=SPLITS, split="test")
    assert [i.sample_id for i in items] == ["1", "2", "3", "4"]  # "5" is val only
    first, second = items[0], items[1]
    assert first.image == "1/image.png" and first.answer == "B" and first.n_choices == 2
    assert first.subject == "natural science" and first.has_image and first.hint == "" and first.grade == "grade3"
    assert second.image is None and second.hint.startswith("Look at") and not second.has_image
    assert "<image>" not in first.prompt and first.prompt.endswith(ANSWER_SUFFIX)
    assert items[3].answer == "C" and items[3].n_choices == 4


def test_load_without_metadata_reads_answer_and_options_from_the_file():
    items = scienceqa.load(DATA)
    assert len(items) == 5
    assert [i.answer for i in items] == ["B", "A", "A", "C", "B"]
    assert [i.n_choices for i in items] == [2, 3, 2, 4, 2]
    assert items[0].subject is None


def test_load_errors_name_file_and_record(tmp_path):
    bad = tmp_path / "sqa.json"
    bad.write_text(
        json.dumps(
            [
                {
                    "id": "9",
                    "conversations": [
                        {"from": "human", "value": "Q?\nA. x\nB. y"},
                        {"from": "gpt", "value": "no idea"},
                    ],
                }
            ]
        )
    )
    with pytest.raises(ValueError, match=r"sqa.json: record '9' has no readable answer"):
        scienceqa.load(bad)
    with pytest.raises(KeyError, match=r"no problem '9'"):
        scienceqa.load(bad, problems=PROBLEMS)
    conflicting = tmp_path / "conflict.json"
    conflicting.write_text(
        json.dumps(
            [
                {
                    "id": "1",
                    "conversations": [{"from": "human", "value": "Q?\nA. x\nB. y"}, {"from": "gpt", "value": "A"}],
                }
            ]
        )
    )
    with pytest.raises(ValueError, match="answers A but .*problems.json says B"):
        scienceqa.load(conflicting, problems=PROBLEMS)
    with pytest.raises(KeyError, match="no split 'dev'"):
        scienceqa.load(DATA, problems=PROBLEMS, pid_splits=SPLITS, split="dev")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        scienceqa.load(tmp_path / "nope.json")


def test_evaluate_table1_columns_hand_checked():
    items = scienceqa.load(DATA, problems=PROBLEMS, pid_splits=SPLITS)
    # 1 NAT/IMG/G1-6 right; 2 SOC/TXT/G7-12 right; 3 LAN/NO/G1-6 failed (C beyond 2 choices);
    # 4 NAT/TXT/IMG/G7-12 failed (unreadable).
    outputs = ["B", "The answer is A.", "C", "square"]
    metrics, samples = scienceqa.evaluate(items, outputs)
    assert metrics == {
        "Avg": 50.0,
        "NAT": 50.0,
        "SOC": 100.0,
        "LAN": 0.0,
        "TXT": 50.0,
        "IMG": 50.0,
        "NO": 0.0,
        "G1-6": 50.0,
        "G7-12": 50.0,
        "n": 4,
        "correct": 2,
        "failed": 2,
    }
    assert list(metrics)[:9] == list(scienceqa.COLUMNS)
    assert [s["parsed"] for s in samples] == ["B", "A", None, None]
    assert samples[2]["output"] == "C" and samples[2]["failed"] and not samples[2]["correct"]


def test_metrics_two_decimals_empty_category_and_no_metadata():
    base = {"subject": "natural science", "hint": "", "has_image": True, "grade": "grade2"}
    samples = [dict(base, correct=c) for c in (True, True, False)]
    out = scienceqa.metrics(samples)
    assert out["Avg"] == 66.67 and out["NAT"] == 66.67 and out["SOC"] is None and out["G7-12"] is None
    assert scienceqa.metrics([{"correct": True, "subject": None}]) == {"Avg": 100.0}
    with pytest.raises(ValueError, match="2 items but 1 outputs"):
        scienceqa.evaluate(scienceqa.load(DATA)[:2], ["A"])
