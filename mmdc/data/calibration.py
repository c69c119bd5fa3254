"""The assessment maths of paper section 3.3.2: two referee orders -> mean scores -> Eq. 6 -> hard / easy.

The referee scores every cache-pool instruction twice, once with the teacher
as Assistant 1 (order A) and once with the student as Assistant 1 (order B),
to cancel its positional bias; each model's score is the mean of its two
scores and the instruction's difficulty is

    S = (|R_S - R_T| + 1) / max(R_S, R_T)        (Eq. 6)

hard iff S >= tau. Scores must lie in 1..10, so S lies in [0.1, 1] and is
never a division by zero. A reply that cannot be read is never turned into a
number: the row is kept, marked unscored, with the reason and the raw replies,
so a user can see what the referee said.

With ``calibration.referee_scoring: likelihood`` the two scores come from the
teacher's probability of each answer instead of a referee reply
(``likelihood_score``); they are written as a reply in the paper's format
(``likelihood_reply``), so the maths above and the assessment files are the same.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from mmdc.roles import SCORE_MAX, SCORE_MIN, RefereeParseError, parse_referee

# Input columns of assess_table (the caller has already retried bad replies).
ASSESS_INPUT_COLUMNS = (
    "instruction_id",
    "image_id",
    "question",
    "teacher_answer",
    "student_answer",
    "reply_teacher_first",  # order A: teacher is Assistant 1
    "reply_student_first",  # order B: student is Assistant 1
)
# Output columns, in contract order.
ASSESSMENT_COLUMNS = (
    "instruction_id",
    "image_id",
    "question",
    "teacher_answer",
    "student_answer",
    "referee_replies",
    "scores_student",
    "scores_teacher",
    "score_student",
    "score_teacher",
    "difficulty",
    "hard",
    "unscored_reason",
)


def difficulty(r_s: float, r_t: float) -> float:
    """Eq. 6: (|R_S - R_T| + 1) / max(R_S, R_T) for student score R_S and teacher score R_T, both in 1..10.

    Raises ValueError for a score outside 1..10 or not a finite number.
    """
    for name, value in (("r_s", r_s), ("r_t", r_t)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not SCORE_MIN <= value <= SCORE_MAX:
            raise ValueError(f"{name}={value} is outside the referee scale {SCORE_MIN:g}..{SCORE_MAX:g}")
    return (abs(r_s - r_t) + 1.0) / max(r_s, r_t)


def _parse_order(reply: Any, order: str) -> tuple[float, float]:
    if reply is None or (isinstance(reply, float) and math.isnan(reply)):
        raise RefereeParseError(f"order {order}: no reply", "")
    try:
        return parse_referee(reply)
    except RefereeParseError as err:
        raise RefereeParseError(f"order {order}: {err.reason}", err.text) from err


def combine_orders(reply_teacher_first: str | None, reply_student_first: str | None) -> dict[str, Any]:
    """Scores of one instruction from its two referee replies.

    Order A (``reply_teacher_first``) has the teacher as Assistant 1, order B
    (``reply_student_first``) has the student as Assistant 1. Returns a dict
    with ``referee_replies`` [A, B] always, and either the per-order lists
    ``scores_teacher`` / ``scores_student`` ([A, B]) with their means
    ``score_teacher`` / ``score_student`` and ``unscored_reason`` None, or all
    scores None and ``unscored_reason`` naming the order and what was wrong.
    """
    result: dict[str, Any] = {
        "referee_replies": [reply_teacher_first, reply_student_first],
        "scores_teacher": None,
        "scores_student": None,
        "score_teacher": None,
        "score_student": None,
        "unscored_reason": None,
    }
    try:
        teacher_a, student_a = _parse_order(reply_teacher_first, "A (teacher first)")
        student_b, teacher_b = _parse_order(reply_student_first, "B (student first)")
    except RefereeParseError as err:
        result["unscored_reason"] = err.reason
        return result
    result["scores_teacher"] = [teacher_a, teacher_b]
    result["scores_student"] = [student_a, student_b]
    result["score_teacher"] = (teacher_a + teacher_b) / 2.0
    result["score_student"] = (student_a + student_b) / 2.0
    return result


def assess_table(df: pd.DataFrame, tau: float) -> pd.DataFrame:
    """The assessment table of one iteration: scores, Eq. 6 difficulty and the hard / easy split.

    ``df`` has one row per cache-pool instruction with ASSESS_INPUT_COLUMNS,
    and optionally ``referee_replies`` (every raw reply, retries included),
    kept as is; without it ``referee_replies`` is [order A reply, order B reply].
    The result has ASSESSMENT_COLUMNS in that order and the input's row order:
    ``hard`` is a nullable boolean (True iff difficulty >= tau, NA when
    unscored), ``difficulty`` and the mean scores are NaN when unscored.
    """
    missing = [name for name in ASSESS_INPUT_COLUMNS if name not in df.columns]
    if missing:
        raise ValueError(f"assess_table: missing input column(s) {missing}; expected {list(ASSESS_INPUT_COLUMNS)}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise ValueError(f"assess_table: tau must be a finite number, got {tau!r}")
    duplicated = df["instruction_id"][df["instruction_id"].duplicated()]
    if len(duplicated):
        raise ValueError(f"assess_table: instruction_id {duplicated.iloc[0]!r} appears more than once")

    combined = [
        combine_orders(a, b) for a, b in zip(df["reply_teacher_first"].tolist(), df["reply_student_first"].tolist())
    ]
    out = pd.DataFrame(
        {
            "instruction_id": df["instruction_id"].to_numpy(),
            "image_id": df["image_id"].to_numpy(),
            "question": df["question"].to_numpy(),
            "teacher_answer": df["teacher_answer"].to_numpy(),
            "student_answer": df["student_answer"].to_numpy(),
            "referee_replies": (
                df["referee_replies"].tolist()
                if "referee_replies" in df.columns
                else [c["referee_replies"] for c in combined]
            ),
            "scores_student": [c["scores_student"] for c in combined],
            "scores_teacher": [c["scores_teacher"] for c in combined],
            "score_student": np.array([c["score_student"] for c in combined], dtype=np.float64),
            "score_teacher": np.array([c["score_teacher"] for c in combined], dtype=np.float64),
            # object dtype keeps None (pandas 3 would infer a string dtype and turn None into NaN).
            "unscored_reason": pd.Series([c["unscored_reason"] for c in combined], dtype=object),
        }
    )
    scored = out["unscored_reason"].isna().to_numpy()
    # Eq. 6, vectorised; the parser guarantees both means lie in 1..10, so max >= 1.
    r_s = out["score_student"].to_numpy()  # [rows]
    r_t = out["score_teacher"].to_numpy()  # [rows]
    with np.errstate(invalid="ignore"):  # unscored rows are NaN / NaN
        out["difficulty"] = (np.abs(r_s - r_t) + 1.0) / np.maximum(r_s, r_t)
    hard = pd.array([pd.NA] * len(out), dtype="boolean")
    hard[scored] = out["difficulty"].to_numpy()[scored] >= tau
    out["hard"] = hard
    return out[list(ASSESSMENT_COLUMNS)]


# The explanation line of a likelihood reply: no digits, so the parser reads the scores from the first line only.
LIKELIHOOD_EXPLANATION = (
    "Scored by likelihood: each score grows with the mean probability the teacher gives "
    "each token of that answer, given the image and the question."
)


def likelihood_score(logprob: float, tokens: int) -> float:
    """An answer's referee score from its log-likelihood under the teacher prompt (``referee_scoring: likelihood``).

    1 + 9 x the geometric mean of its token probabilities, so it lies in 1..10 like a referee's
    score, and a long answer is not punished for its length (a sum would make every description
    "worse" than every yes). ``tokens`` counts the scored tokens, the stop token included.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    if not math.isfinite(logprob) or logprob > 1e-6:
        raise ValueError(f"logprob must be a finite log-probability (<= 0), got {logprob!r}")
    return SCORE_MIN + (SCORE_MAX - SCORE_MIN) * math.exp(min(0.0, logprob) / tokens)


def likelihood_reply(score_1: float, score_2: float) -> str:
    """Two likelihood scores written as the paper's referee reply: the scores on the first line, then why."""
    return f"{score_1:.2f} {score_2:.2f}\n{LIKELIHOOD_EXPLANATION}"


def random_selection(cache: pd.DataFrame, fraction: float, seed: int, iteration: int) -> pd.DataFrame:
    """The plain-distillation stand-in for an assessment (``calibration.selection: random``).

    No student answers and no referee: ``round(fraction x rows)`` instructions, drawn uniformly
    under (seed, iteration), are marked hard (the augmentor's parents) and the rest easy, so the
    pool update runs unchanged and the ablation differs from MmDC only in *which* parents it picks.
    Same columns as ``assess_table``; scores and difficulty are NaN, ``unscored_reason`` says why.
    """
    ids = np.sort(cache["instruction_id"].astype(str).unique())  # [rows]
    take = min(len(ids), max(0, round(fraction * len(ids))))
    picked = set(np.random.default_rng([seed, iteration, 0x5E1EC7]).choice(len(ids), size=take, replace=False).tolist())
    hard = {iid: i in picked for i, iid in enumerate(ids)}
    rows = cache.drop_duplicates("instruction_id").sort_values("instruction_id", kind="stable")
    n = len(rows)
    return pd.DataFrame(
        {
            "instruction_id": rows["instruction_id"].to_numpy(),
            "image_id": rows["image_id"].to_numpy(),
            "question": rows["question"].to_numpy(),
            "teacher_answer": pd.Series([None] * n, dtype=object),
            "student_answer": pd.Series([None] * n, dtype=object),
            "referee_replies": [[] for _ in range(n)],
            "scores_student": [[] for _ in range(n)],
            "scores_teacher": [[] for _ in range(n)],
            "score_student": np.full(n, np.nan),
            "score_teacher": np.full(n, np.nan),
            "unscored_reason": pd.Series(["selection=random"] * n, dtype=object),
            "difficulty": np.full(n, np.nan),
            "hard": pd.array([hard[str(i)] for i in rows["instruction_id"]], dtype="boolean"),
        }
    )[list(ASSESSMENT_COLUMNS)]


def hard_counts(assessment: pd.DataFrame) -> dict[str, Any]:
    """hard / easy / unscored counts and the hard ratio among scored rows, for an assessment's phase record."""
    flags = assessment["hard"].astype("boolean")  # nullable: <NA> = unscored
    hard, easy = int(flags.eq(True).sum()), int(flags.eq(False).sum())
    return {
        "rows": len(assessment),
        "hard": hard,
        "easy": easy,
        "unscored": len(assessment) - hard - easy,
        "hard_ratio": round(hard / (hard + easy), 4) if hard + easy else None,
    }


def hard_parents(cache: pd.DataFrame, assessment: pd.DataFrame) -> pd.DataFrame:
    """The cache-pool rows assessed hard (the augmentor's parents), by instruction id."""
    hard = assessment["hard"].astype("boolean").eq(True).fillna(False)
    return cache[cache["instruction_id"].isin(set(assessment.loc[hard, "instruction_id"]))].sort_values(
        "instruction_id"
    )
