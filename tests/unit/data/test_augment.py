"""Validity of generated questions: one sentence, no answer, ROUGE-L < 0.7 within the image."""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest
from rouge_score import rouge_scorer
from rouge_score.rouge_scorer import _lcs_table

from mmdc.data.augment import contains_answer, is_one_sentence, lcs_length, rouge_l_f, tokenize, validate_candidates

SCORER = rouge_scorer.RougeScorer(["rougeL"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("What is the man holding?", True),
        ("Describe the image in detail.", True),
        ("What is 3.5 times the width, e.g. of the door?", True),
        ("Is the sign from the U.S. or from Canada?", True),
        ("What is it? A dog.", False),
        ("Is it red? Or blue?", False),
        ("What is it?\nWhy?", False),
        ("Look at the car. What color is it?", False),
        ('He said "stop." Then what?', False),
        ("", False),
        ("   ", False),
    ],
)
def test_is_one_sentence(text, expected):
    assert is_one_sentence(text) is expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("What is the man holding?", False),
        ("What color is the car? Red.", True),
        ("What color is the car? The car is red", True),
        ("What color is the car?\nAnswer: red", True),
        ("Q: What is it? A: a dog", True),
        ("What is the man doing (Answer: running)?", True),
        ("What is the answer to the sign's riddle?", False),
        ("Is it red? Or blue?", False),  # a second question, not an answer (is_one_sentence rejects it)
        ("What is shown?  ", False),
        ("Describe the scene.", False),
    ],
)
def test_contains_answer(text, expected):
    assert contains_answer(text) is expected


def test_lcs_matches_rouge_score_table():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 14))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 14))]
        expected = _lcs_table(a, b)[-1][-1] if a and b else 0
        assert lcs_length(a, b) == expected


def test_rouge_l_f_equals_rouge_score_bit_for_bit():
    rng = random.Random(1)
    words = ["the", "a", "man", "dog", "Red", "car?", "is", "what's", "3.5", "on"]
    for _ in range(300):
        target = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        prediction = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        expected = SCORER.score(target, prediction)["rougeL"].fmeasure
        assert rouge_l_f(tokenize(target), tokenize(prediction)) == expected


def test_tokenize_is_rouge_score_default():
    assert tokenize("What's the Man's 3.5-inch thing?") == ["what", "s", "the", "man", "s", "3", "5", "inch", "thing"]


def _candidates(rows):
    return pd.DataFrame(rows, columns=["instruction_id", "image_id", "question"])


def _existing(rows):
    return pd.DataFrame(rows, columns=["image_id", "question"])


BASE = "what is the colour of the big car near home"  # 10 tokens


def test_threshold_boundary_matches_rouge_score():
    # 7 of 10 tokens in order -> LCS 7, F = 0.7 exactly as rouge_score computes it: rejected ("below 0.7" passes).
    at = "what is the colour of the big bus at sea"
    below = "what is the colour of the small bus at a lake"  # LCS 6 of 10 / 11 tokens
    value_at = SCORER.score(BASE, at)["rougeL"].fmeasure
    value_below = SCORER.score(BASE, below)["rougeL"].fmeasure
    assert value_at == pytest.approx(0.7) and value_below < 0.7
    out = validate_candidates(
        _candidates([("c1", "img", at + "?"), ("c2", "img2", below + "?")]),
        _existing([("img", BASE), ("img2", BASE)]),
    )
    assert out["rouge_l_max"].tolist() == [value_at, value_below]
    assert out["accepted"].tolist() == [False, True]
    assert out["reject_reason"].tolist() == ["too_similar", None]
    # Exactly at rouge_score's own value: rejected; one ulp above it: accepted.
    cand = _candidates([("c1", "img", at + "?")])
    assert not validate_candidates(cand, _existing([("img", BASE)]), threshold=value_at)["accepted"].iloc[0]
    above = math.nextafter(value_at, 1.0)
    assert validate_candidates(cand, _existing([("img", BASE)]), threshold=above)["accepted"].iloc[0]


def test_only_same_image_questions_count():
    out = validate_candidates(
        _candidates([("c1", "img_a", BASE + "?")]),
        _existing([("img_b", BASE), ("img_a", "how many dogs are there")]),
    )
    assert out["accepted"].tolist() == [True]
    assert out["rouge_l_max"].iloc[0] < 0.3


def test_reasons_and_round_order():
    existing = _existing([("img", BASE), ("img", "how many people are in the picture")])
    cands = _candidates(
        [
            ("c5", "img", "Why is the man smiling at the small dog?"),  # after c3 (id order): too similar to c3
            ("c1", "img", ""),
            ("c2", "img", "What is it? A car."),
            ("c3", "img", "Why is the man smiling at the dog?"),
            ("c4", "img", "Why is the man smiling at the dog?"),  # same tokens as c3, accepted earlier
            ("c6", "img", "How many people are in the picture?"),  # same tokens as an existing question
            ("c7", "img", "Where is it? Why?"),
            ("c8", "other", "Why is the man smiling at the dog?"),  # another image: no clash
            ("c9", "img", "?!"),
        ]
    )
    out = validate_candidates(cands, existing).set_index("instruction_id")
    assert out.loc["c1", "reject_reason"] == "empty"
    assert out.loc["c2", "reject_reason"] == "contains_answer"
    assert out.loc["c3", "reject_reason"] is None
    assert out.loc["c4", "reject_reason"] == "duplicate_in_round"
    assert out.loc["c5", "reject_reason"] == "too_similar"
    assert out.loc["c6", "reject_reason"] == "duplicate"
    assert out.loc["c7", "reject_reason"] == "multiple_sentences"
    assert out.loc["c8", "reject_reason"] is None
    assert out.loc["c9", "reject_reason"] == "empty"
    assert out.loc["c6", "rouge_l_max"] == 1.0
    assert (
        out.loc["c5", "rouge_l_max"]
        == SCORER.score("Why is the man smiling at the dog?", "Why is the man smiling at the small dog?")[
            "rougeL"
        ].fmeasure
    )
    assert out["accepted"].tolist() == [r is None for r in out["reject_reason"]]


def test_result_does_not_depend_on_row_order():
    rows = [
        ("b", "img", "Why is the man smiling at the dog?"),
        ("a", "img", "Why is the man smiling at the small dog?"),
        ("c", "img", "What is on the table?"),
    ]
    existing = _existing([("img", BASE)])
    one = validate_candidates(_candidates(rows), existing).set_index("instruction_id").sort_index()
    two = validate_candidates(_candidates(rows[::-1]), existing).set_index("instruction_id").sort_index()
    pd.testing.assert_frame_equal(one, two)
    assert one.loc["a", "accepted"] and not one.loc["b", "accepted"]  # "a" comes first in id order


def test_keeps_input_columns_and_order_and_ignores_self_in_existing():
    cands = _candidates([("c2", "img", "What is on the table?"), ("c1", "img", "Where is the cat?")])
    cands["parent_id"] = ["p2", "p1"]
    existing = pd.DataFrame(
        {"instruction_id": ["c2", "x"], "image_id": ["img", "img"], "question": ["What is on the table?", BASE]}
    )
    out = validate_candidates(cands, existing)
    assert out["instruction_id"].tolist() == ["c2", "c1"]
    assert out["parent_id"].tolist() == ["p2", "p1"]
    assert out["accepted"].tolist() == [True, True]


def test_bad_input():
    with pytest.raises(ValueError, match="candidates_df lacks column"):
        validate_candidates(pd.DataFrame({"question": []}), _existing([]))
    with pytest.raises(ValueError, match="appears twice"):
        validate_candidates(_candidates([("c", "i", "q?"), ("c", "i", "r?")]), _existing([]))


def test_accept_candidates_checks_replies_against_both_pools_with_lineage():
    from mmdc.data.augment import accept_candidates
    from mmdc.data.schema import generated_instruction_id

    pool = pd.DataFrame(
        {
            "instruction_id": ["p1", "p2"],
            "image_id": ["img", "img"],
            "question": ["What colour is the circle?", "How many squares are there?"],
        }
    )
    replies = pd.DataFrame(
        {
            "instruction_id": ["p2", "p1"],
            "image_id": ["img", "img"],
            "image": ["img.png"] * 2,
            "candidate": ["How many squares are there?", "Which shape is the largest one in the picture?"],
            "attempt": [0, 1],
            "source_id": ["s", "s"],
            "augmentor_reply": ["r2", "r1"],
        }
    )
    checked = accept_candidates(replies, pool, pool, iteration=2)
    assert checked["parent_id"].tolist() == ["p1", "p2"]  # parent id order
    assert checked["instruction_id"].tolist() == [
        generated_instruction_id("p1", 2, 1),
        generated_instruction_id("p2", 2, 0),
    ]
    assert checked["accepted"].tolist() == [True, False]  # p2's candidate repeats a question of its image


def test_round_record_counts_candidates_and_rejections_by_reason():
    from mmdc.data.augment import round_record

    checked = pd.DataFrame(
        {"accepted": [True, False, False, True], "reject_reason": [None, "duplicate", "too_similar", None]}
    )
    assert round_record(checked, parents=4) == {
        "rows": 4,
        "generated": 4,
        "acceptance_ratio": 0.5,
        "rejected": {"duplicate": 1, "too_similar": 1},
    }
    assert round_record(checked.iloc[:0], parents=0)["acceptance_ratio"] is None
