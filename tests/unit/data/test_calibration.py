"""Eq. 6, combining the two referee orders, and the assessment table with its tau split."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mmdc.data.calibration import ASSESSMENT_COLUMNS, assess_table, combine_orders, difficulty


@pytest.mark.parametrize(
    "r_s, r_t, expected",
    [
        (1, 1, 1.0),  # both fail: hard (the paper's prose names the other one harder; Eq. 6 is what counts)
        (9, 9, 1 / 9),
        (10, 5, 0.6),
        (5, 10, 0.6),
        (8, 7, 0.25),
        (1, 10, 1.0),
        (7.5, 7.5, 1 / 7.5),
    ],
)
def test_difficulty_values(r_s, r_t, expected):
    assert difficulty(r_s, r_t) == pytest.approx(expected, abs=1e-12)


def test_difficulty_hand_values_exact():
    assert difficulty(9, 9) == pytest.approx(0.1111111111, abs=1e-9)
    assert difficulty(8, 7) == 0.25
    assert difficulty(10, 5) == 0.6


@pytest.mark.parametrize("bad", [0, 0.99, 10.01, -3, float("nan"), float("inf"), None, "8", True])
def test_difficulty_rejects_scores_off_scale(bad):
    with pytest.raises(ValueError):
        difficulty(bad, 5)
    with pytest.raises(ValueError):
        difficulty(5, bad)


def test_combine_orders_maps_positions():
    # Order A: teacher is Assistant 1 (9), student 2 (6). Order B: student is Assistant 1 (7), teacher 2 (8).
    result = combine_orders("The scores for Assistant 1 and 2 are 9 and 6, respectively.", "7 and 8")
    assert result["scores_teacher"] == [9.0, 8.0]
    assert result["scores_student"] == [6.0, 7.0]
    assert result["score_teacher"] == 8.5
    assert result["score_student"] == 6.5
    assert result["unscored_reason"] is None


@pytest.mark.parametrize(
    "a, b, fragment",
    [
        ("8 and 7", "no numbers", "order B"),
        ("12 and 7", "8 and 7", "order A"),
        (None, "8 and 7", "order A (teacher first): no reply"),
        ("8 and 7", float("nan"), "order B (student first): no reply"),
    ],
)
def test_combine_orders_unscored(a, b, fragment):
    result = combine_orders(a, b)
    assert fragment in result["unscored_reason"]
    assert result["score_teacher"] is None and result["score_student"] is None
    assert result["scores_teacher"] is None and result["scores_student"] is None
    assert result["referee_replies"][0] is a  # raw replies kept as given


def _input(replies: list[tuple[str | None, str | None]]) -> pd.DataFrame:
    n = len(replies)
    return pd.DataFrame(
        {
            "instruction_id": [f"id{i}" for i in range(n)],
            "image_id": ["img"] * n,
            "question": [f"q{i}" for i in range(n)],
            "teacher_answer": ["t"] * n,
            "student_answer": ["s"] * n,
            "reply_teacher_first": [a for a, _ in replies],
            "reply_student_first": [b for _, b in replies],
        },
        index=range(100, 100 + n),
    )


def test_assess_table_columns_values_and_split():
    df = _input(
        [
            ("8 and 7", "7 and 8"),  # T 8, S 7 -> 0.25, easy at 0.33
            ("1 and 1", "1 and 1"),  # 1.0, hard
            ("9 9", "9 9"),  # 0.111, easy
            ("10 and 5", "5 and 10"),  # T 10, S 5 -> 0.6, hard
            ("garbage", "8 and 7"),  # unscored
        ]
    )
    out = assess_table(df, tau=0.33)
    assert list(out.columns) == list(ASSESSMENT_COLUMNS)
    assert out["instruction_id"].tolist() == ["id0", "id1", "id2", "id3", "id4"]
    assert out["score_teacher"].tolist()[:4] == [8.0, 1.0, 9.0, 10.0]
    assert out["score_student"].tolist()[:4] == [7.0, 1.0, 9.0, 5.0]
    assert out["difficulty"].tolist()[:4] == pytest.approx([0.25, 1.0, 1 / 9, 0.6])
    assert out["hard"].tolist()[:4] == [False, True, False, True]
    assert out["unscored_reason"].tolist()[:4] == [None] * 4
    # The unscored row: no number invented, reason and raw replies kept.
    last = out.iloc[4]
    assert pd.isna(last["hard"]) and math.isnan(last["difficulty"]) and math.isnan(last["score_teacher"])
    assert last["scores_teacher"] is None
    assert "order A" in last["unscored_reason"]
    assert last["referee_replies"] == ["garbage", "8 and 7"]
    assert str(out["hard"].dtype) == "boolean"


def test_assess_table_tau_boundary_is_inclusive():
    df = _input([("8 and 7", "7 and 8")])  # difficulty exactly 0.25
    assert assess_table(df, tau=0.25)["hard"].tolist() == [True]
    assert assess_table(df, tau=0.2500001)["hard"].tolist() == [False]
    assert assess_table(df, tau=0.0)["hard"].tolist() == [True]  # tau 0: everything hard (paper's ablation)


def test_assess_table_means_of_unequal_orders():
    # T: 9 then 8 -> 8.5; S: 6 then 7 -> 6.5; S = (2 + 1) / 8.5
    out = assess_table(_input([("9 and 6", "7 and 8")]), tau=0.33)
    assert out["difficulty"].iloc[0] == pytest.approx(3 / 8.5)
    assert out["difficulty"].iloc[0] == difficulty(6.5, 8.5)
    assert out["scores_teacher"].iloc[0] == [9.0, 8.0]


def test_assess_table_errors():
    df = _input([("8 and 7", "7 and 8")])
    with pytest.raises(ValueError, match="reply_student_first"):
        assess_table(df.drop(columns=["reply_student_first"]), 0.33)
    with pytest.raises(ValueError, match="id0"):
        assess_table(pd.concat([df, df]), 0.33)
    with pytest.raises(ValueError, match="tau"):
        assess_table(df, float("nan"))


def test_assess_table_empty():
    out = assess_table(_input([]), 0.33)
    assert len(out) == 0 and list(out.columns) == list(ASSESSMENT_COLUMNS)


def test_assess_table_keeps_callers_reply_history():
    df = _input([("garbage", "8 and 7")])
    df["referee_replies"] = [["[A0] nonsense", "[A1] garbage", "[B0] 8 and 7"]]
    out = assess_table(df, 0.33)
    assert out["referee_replies"].iloc[0] == ["[A0] nonsense", "[A1] garbage", "[B0] 8 and 7"]


def test_random_selection_marks_a_seeded_fraction_hard_and_the_rest_easy():
    import pandas as pd
    import pyarrow as pa

    from mmdc.data.calibration import ASSESSMENT_COLUMNS, random_selection

    cache = pd.DataFrame(
        {"instruction_id": [f"i{n:02d}" for n in range(10)], "image_id": ["img"] * 10, "question": ["q"] * 10}
    )
    a = random_selection(cache, 0.3, seed=0, iteration=1)
    assert list(a.columns) == list(ASSESSMENT_COLUMNS)
    assert int(a["hard"].eq(True).sum()) == 3 and int(a["hard"].eq(False).sum()) == 7
    assert a["unscored_reason"].eq("selection=random").all()
    same = random_selection(cache.iloc[::-1], 0.3, seed=0, iteration=1)  # row order does not matter
    assert list(same["instruction_id"][same["hard"]]) == list(a["instruction_id"][a["hard"]])
    other = random_selection(cache, 0.3, seed=0, iteration=2)  # a new draw each iteration
    assert int(other["hard"].sum()) == 3
    pa.Table.from_pandas(a, preserve_index=False)  # writes to Parquet as the driver does


def test_likelihood_score_is_the_geometric_mean_probability_on_the_referee_scale():
    from mmdc.data.calibration import likelihood_score

    assert likelihood_score(0.0, 3) == 10.0  # certain
    assert likelihood_score(4 * math.log(0.5), 4) == pytest.approx(5.5)  # every token at p = 0.5
    assert likelihood_score(-1000.0, 2) == pytest.approx(1.0)  # impossible: the bottom of the scale, not below
    assert likelihood_score(-2.0, 4) > likelihood_score(-2.0, 2)  # the same total over more tokens is better per token
    for bad_logprob, bad_tokens in [(0.5, 2), (float("nan"), 2), (-1.0, 0), (-1.0, True)]:
        with pytest.raises(ValueError):
            likelihood_score(bad_logprob, bad_tokens)


def test_likelihood_reply_reads_back_as_a_referee_reply():
    from mmdc.data.calibration import likelihood_reply
    from mmdc.roles import parse_referee

    assert parse_referee(likelihood_reply(8.4312, 1.0)) == (8.43, 1.0)
    assert combine_orders(likelihood_reply(9, 2), likelihood_reply(2, 9))["score_student"] == 2.0


def test_hard_counts_and_parents_read_a_nullable_hard_column():
    from mmdc.data.calibration import hard_counts, hard_parents

    assessment = pd.DataFrame({"instruction_id": ["a", "b", "c", "d"], "hard": [True, False, None, True]})
    assert hard_counts(assessment) == {"rows": 4, "hard": 2, "easy": 1, "unscored": 1, "hard_ratio": round(2 / 3, 4)}
    cache = pd.DataFrame({"instruction_id": ["d", "c", "b", "a"], "question": ["qd", "qc", "qb", "qa"]})
    assert hard_parents(cache, assessment)["instruction_id"].tolist() == ["a", "d"]  # unscored is not hard
    assert hard_counts(assessment.iloc[2:3])["hard_ratio"] is None  # nothing scored: no ratio, not 0
