"""The augmentor's new questions (paper section 3.3.3): pool rows with lineage, and their validity.

A generated question is kept only if it is one sentence, carries no answer,
and its ROUGE-L F-measure against every other question of the same image (in
both pools, and among the questions accepted earlier in the same round) is
below 0.7, the Self-Instruct rule the paper follows.

ROUGE-L is the ``rouge-score`` package's ``rougeL`` (its default tokenizer,
no stemming, its f-measure formula), so numbers match what anyone computes
with ``RougeScorer(["rougeL"]).score``. Speed comes from doing less, not from
changing the definition: each question is tokenised once, only questions of
the same image are ever compared, and the LCS length is computed with a
bit-parallel algorithm (Hyyrö 2004) that returns exactly the length
rouge-score's dynamic-programming table does, in one pass over the tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from rouge_score import scoring
from rouge_score.tokenizers import DefaultTokenizer

from mmdc.data.schema import POOL_COLUMNS, generated_instruction_id

ROUGE_L_THRESHOLD = 0.7

_TOKENIZER = DefaultTokenizer(use_stemmer=False)  # what RougeScorer(["rougeL"]) uses by default

# Full stops that do not end a sentence: decimals, initialisms, common abbreviations.
_NOT_A_STOP_RE = re.compile(
    r"(?<=\d)\.(?=\d)"
    r"|\b(?:e\.g|i\.e|etc|vs|mr|mrs|ms|dr|st|no|fig|approx|u\.s|a\.m|p\.m)\.",
    re.IGNORECASE,
)
# A sentence end: terminal punctuation (plus closing quotes / brackets) followed by more text.
_SENTENCE_BREAK_RE = re.compile(r"[.!?]+[\"'”’)\]]*\s+(?=\S)|\n\s*(?=\S)")
# An answer label: "Answer:", "A:", "(Answer: ...)", "Correct answer -".
_ANSWER_MARKER_RE = re.compile(
    r"(?:^|[\s(\[])(?:(?:correct\s+|short\s+)?answer|ans|a|solution)\s*[:：]",
    re.IGNORECASE,
)


def tokenize(text: str) -> list[str]:
    """rouge-score's default tokenisation: lower case, alphanumeric runs only, no stemming."""
    return _TOKENIZER.tokenize(text)


def is_one_sentence(text: str) -> bool:
    """True if ``text`` is exactly one non-empty sentence (a line break or a second sentence makes it two).

    Decimals ("3.5") and common abbreviations ("e.g.", "Mr.") do not end a sentence.
    """
    if not isinstance(text, str) or not text.strip():
        return False
    masked = text.strip()
    if "." in masked:  # the abbreviation scan is the slow part; most questions have no full stop at all
        masked = _NOT_A_STOP_RE.sub(lambda m: m.group(0).replace(".", "\x00"), masked)
    return _SENTENCE_BREAK_RE.search(masked) is None


def contains_answer(text: str) -> bool:
    """True if ``text`` carries an answer besides the question.

    Catches an answer label ("Answer:", "A:", "(Answer: ...)") and a
    statement after the final question mark ("What color is the car? Red.").
    A second question after the first ("Is it red? Or blue?") is not an
    answer; is_one_sentence rejects that.
    """
    if not isinstance(text, str):
        return False
    if _ANSWER_MARKER_RE.search(text):
        return True
    last_q = text.rfind("?")
    return last_q >= 0 and re.search(r"[A-Za-z0-9]", text[last_q + 1 :]) is not None


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (bit-parallel, Hyyrö 2004).

    Same value as rouge_score.rouge_scorer._lcs_table(a, b)[-1][-1], in O(len(b)) big-int steps.
    """
    if not a or not b:
        return 0
    return _lcs_with_masks(_match_masks(a), len(a), b)


def _match_masks(a: Sequence[str]) -> dict[str, int]:
    """For each token of ``a``, a bitmask of the positions where it occurs (bit i = a[i])."""
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    return masks


def _lcs_with_masks(masks: dict[str, int], n: int, b: Iterable[str]) -> int:
    """LCS length of the sequence behind ``masks`` (length ``n``) and ``b``.

    Bit i of v is set while row i of the DP table has not yet gained a match. Bits above n
    only collect carries and never flow back down, so one mask at the end is enough.
    """
    v = (1 << n) - 1
    for m in map(masks.get, b):
        if m:
            u = v & m
            v = (v + u) | (v - u)
    return n - (v & ((1 << n) - 1)).bit_count()


def rouge_l_f(target_tokens: Sequence[str], prediction_tokens: Sequence[str]) -> float:
    """ROUGE-L F-measure exactly as rouge_score computes it, from already tokenised text."""
    if not target_tokens or not prediction_tokens:
        return 0.0
    lcs = lcs_length(target_tokens, prediction_tokens)
    return scoring.fmeasure(lcs / len(prediction_tokens), lcs / len(target_tokens))


def _isin(column: pd.Series, members: np.ndarray) -> np.ndarray:
    """Boolean mask of ``column`` values found in ``members``, via Arrow (pandas' string isin is a Python loop)."""
    values = pa.array(column.astype(str), pa.string())
    found = pc.is_in(values, value_set=pa.array(members.astype(str).tolist(), pa.string()))
    return np.asarray(found.to_numpy(zero_copy_only=False), dtype=bool)


def _format_reason(question: object) -> str | None:
    """Why a question fails the format rules, or None if it passes."""
    if not isinstance(question, str) or not question.strip():
        return "empty"
    if contains_answer(question):
        return "contains_answer"
    if not is_one_sentence(question):
        return "multiple_sentences"
    return None


def validate_candidates(
    candidates_df: pd.DataFrame,
    existing_questions_df: pd.DataFrame,
    threshold: float = ROUGE_L_THRESHOLD,
) -> pd.DataFrame:
    """Mark which generated questions are valid; returns ``candidates_df`` plus three columns.

    candidates_df: instruction_id, image_id, question (other columns are kept).
    existing_questions_df: image_id, question of every question already in
    either pool (duplicates are fine; rows whose instruction_id is a
    candidate's, if that column is present, are ignored).

    Added columns: ``rouge_l_max`` (highest ROUGE-L F against the image's
    existing questions and the candidates of that image accepted before it;
    0.0 when there is nothing to compare), ``accepted`` (bool) and
    ``reject_reason`` (None when accepted, else one of: empty,
    contains_answer, multiple_sentences, duplicate (same tokens as an existing
    question), duplicate_in_round (same tokens as a candidate accepted before
    it), too_similar (rouge_l_max >= threshold)). Within an image, candidates
    are taken in instruction_id order, so the result does not depend on row
    order.
    """
    for name, frame, needed in (
        ("candidates_df", candidates_df, ("instruction_id", "image_id", "question")),
        ("existing_questions_df", existing_questions_df, ("image_id", "question")),
    ):
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise ValueError(f"validate_candidates: {name} lacks column(s) {missing}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"validate_candidates: threshold must be in (0, 1], got {threshold}")
    ids = candidates_df["instruction_id"]
    if ids.duplicated().any():
        raise ValueError(f"validate_candidates: instruction_id {ids[ids.duplicated()].iloc[0]!r} appears twice")

    n = len(candidates_df)
    questions = candidates_df["question"].tolist()
    image_ids = candidates_df["image_id"].astype(str).to_numpy()
    reasons: list[str | None] = [_format_reason(q) for q in questions]
    rouge_max = np.zeros(n, dtype=np.float64)  # [candidates]

    # Only the existing questions of images that have candidates, each distinct text tokenised once.
    existing = existing_questions_df
    keep = _isin(existing["image_id"], image_ids)
    if "instruction_id" in existing.columns:
        keep &= ~_isin(existing["instruction_id"], ids.to_numpy())
    existing = existing[keep].drop_duplicates(["image_id", "question"])
    existing_by_image: dict[str, list[tuple[str, ...]]] = {}
    token_cache: dict[str, tuple[str, ...]] = {}
    for image_id, question in zip(existing["image_id"].astype(str).tolist(), existing["question"].tolist()):
        if not isinstance(question, str):
            continue
        tokens = token_cache.get(question)
        if tokens is None:
            tokens = token_cache[question] = tuple(tokenize(question))
        if tokens:
            existing_by_image.setdefault(image_id, []).append(tokens)

    # Deterministic order within the round: by image, then by instruction_id.
    order = np.lexsort((ids.astype(str).to_numpy(), image_ids))  # [candidates]
    accepted_by_image: dict[str, list[tuple[str, ...]]] = {}
    for row in order.tolist():
        image_id = image_ids[row]
        question = questions[row]
        tokens = tuple(tokenize(question)) if isinstance(question, str) else ()
        if reasons[row] is None and not tokens:
            reasons[row] = "empty"  # punctuation only: nothing ROUGE can compare
        earlier = accepted_by_image.get(image_id, [])
        others = existing_by_image.get(image_id, [])
        best = 0.0
        if tokens:
            masks, length = _match_masks(tokens), len(tokens)
            for other in (*others, *earlier):
                lcs = _lcs_with_masks(masks, length, other)
                # target = the other question, prediction = the candidate (F is symmetric anyway).
                f = scoring.fmeasure(lcs / length, lcs / len(other)) if lcs else 0.0
                if f > best:
                    best = f
        rouge_max[row] = best
        if reasons[row] is not None:
            continue
        if tokens in others:
            reasons[row] = "duplicate"
        elif tokens in earlier:
            reasons[row] = "duplicate_in_round"
        elif best >= threshold:
            reasons[row] = "too_similar"
        else:
            accepted_by_image.setdefault(image_id, []).append(tokens)

    out = candidates_df.copy()
    out["rouge_l_max"] = rouge_max
    out["accepted"] = np.array([r is None for r in reasons], dtype=bool)
    out["reject_reason"] = pd.Series(reasons, index=out.index, dtype=object)
    return out


def candidate_rows(replies: pd.DataFrame, iteration: int) -> pd.DataFrame:
    """Augmentor replies (one per hard parent: its pool row + ``candidate``, ``attempt``, ``augmentor_reply``)
    -> pool rows of origin ``generated`` with lineage to their parent, in parent id order."""
    rows = [
        {
            "instruction_id": generated_instruction_id(r.instruction_id, iteration, r.attempt),
            "image_id": r.image_id,
            "image": r.image,
            "question": r.candidate,
            "origin": "generated",
            "parent_id": r.instruction_id,
            "iteration": iteration,
            "turn": -1,
            "image_position": "none",
            "source_id": r.source_id,
            "augmentor_reply": r.augmentor_reply,
        }
        for r in replies.sort_values("instruction_id").itertuples()
    ]
    return pd.DataFrame(rows, columns=[*POOL_COLUMNS, "augmentor_reply"])


def accept_candidates(
    replies: pd.DataFrame,
    tuning: pd.DataFrame,
    cache: pd.DataFrame,
    iteration: int,
    threshold: float = ROUGE_L_THRESHOLD,
) -> pd.DataFrame:
    """The augmentor's replies as candidate pool rows, each checked against every question of its image in both
    pools (``validate_candidates``): the generated file's rows, with ``accepted`` and ``reject_reason``."""
    existing = pd.concat([tuning, cache])[["instruction_id", "image_id", "question"]].drop_duplicates("instruction_id")
    return validate_candidates(candidate_rows(replies, iteration), existing, threshold=threshold)


def round_record(checked: pd.DataFrame, parents: int) -> dict[str, Any]:
    """What an augment phase's metrics line says about its candidates: parents asked, candidates written, the share
    accepted, and the rejected ones by reason."""
    rejected = checked.loc[~checked["accepted"], "reject_reason"].value_counts().to_dict()
    share = round(float(checked["accepted"].mean()), 4) if len(checked) else None
    return {"rows": parents, "generated": len(checked), "acceptance_ratio": share, "rejected": rejected}
