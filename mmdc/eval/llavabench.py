"""LLaVA-Bench / "LLaVA Test Set" (paper Table 3): a judge scores (reference, model) answer pairs.

Follows LLaVA's ``eval_gpt_review_visual.py`` / ``eval_gpt_review_bench.py`` and
``summarize_gpt_review.py`` so scores compare with the paper (rated by GPT-4):

- the judge sees the context (COCO: five captions and the boxes; in-the-wild: a
  caption), the question, Assistant 1 = the reference answer, Assistant 2 = the
  model's answer, and LLaVA's rule prompt asking for the two scores on the first line;
- a reply is read by LLaVA's ``parse_score`` (``parse_judge``): its first line must be
  exactly two numbers, any numbers (a 0 for an empty answer counts, as in LLaVA);
- a reply that rule cannot read is *unparsed* and, as in LLaVA, averaged in as the
  scores (-1, -1). That distorts a score (an all-unparsed category reads 100.0), so
  it is kept for parity but counted, per category and in total (``unparsed``), and
  each such reply is in the samples with its ``error``;
- per category and over all questions: relative score = mean(model) / mean(reference)
  x 100, with both means x 10 (means rounded to 3 decimals first, ratio to 1), as
  ``summarize_gpt_review.py`` prints them. Categories are shown under the paper's
  Table 3 columns Con / CR / DD (``CATEGORY_COLUMNS``), the pooled score as AVG.

The judge is any engine: it is sent text-only chat requests (``judge_messages``),
which a LLaVA checkpoint, a text LLM or an OpenAI-compatible endpoint all accept.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmdc.roles import RefereeParseError, parse_referee

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_ROLE = "Assistant"

_RULE_TAIL = (
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
    "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space.\n"
    "In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential "
    "bias and ensuring that the order in which the responses were presented does not affect your judgment."
)
_RULE_HEAD = (
    "We would like to request your feedback on the performance of two AI assistants in response to the "
    "user question displayed above."
)
# LLaVA's llava/eval/table/rule.json, verbatim: "conv"/"detail"/"complex" (COCO, captions + boxes),
# "llava_bench_*" (in-the-wild, a caption), "default" (no context).
RULE_COCO = (
    _RULE_HEAD + " The user asks the question on observing an image. For your reference, the visual content in "
    "the image is represented with five descriptive sentences describing the same image and the bounding box "
    "coordinates of each object in the scene. These coordinates are in the form of bounding boxes, represented as "
    "(x1, y1, x2, y2) with floating numbers ranging from 0 to 1. These values correspond to the top left x, top "
    "left y, bottom right x, and bottom right y. \n" + _RULE_TAIL
)
RULE_CAPTION = (
    _RULE_HEAD + " The user asks the question on observing an image. For your reference, the visual content in "
    "the image is represented with a few sentences describing the image. \n" + _RULE_TAIL
)
RULE_DEFAULT = _RULE_HEAD + "\n" + _RULE_TAIL

# Paper Table 3 columns for LLaVA's categories: COCO's question files name them conv/complex/detail,
# LLaVA's in-the-wild review files llava_bench_<name>. Raw names stay in ``details``.
TABLE3_COLUMNS = ("Con", "CR", "DD")  # the paper's order
CATEGORY_COLUMNS = {
    "conv": "Con",
    "complex": "CR",
    "detail": "DD",
    "llava_bench_conv": "Con",
    "llava_bench_complex": "CR",
    "llava_bench_detail": "DD",
}
OVERALL = "AVG"  # LLaVA's "all": pooled over every question (Table 3's AVG, e.g. LLaVA's 85.1)
# LLaVA's parse_score returns [-1, -1] for a reply it cannot read; summarize_gpt_review.py averages it in.
UNPARSED_SCORES = (-1.0, -1.0)


@dataclass(frozen=True)
class LlavaBenchItem:
    """One question with its reference answer and the judge's context."""

    sample_id: str  # question_id
    prompt: str  # the question, as the model is asked
    image: str  # file name inside the image folder
    category: str  # "conv" | "detail" | "complex" (or the file's own)
    reference: str  # the reference (GPT-4) answer
    context: str | None  # captions (+ boxes) shown to the judge, None without a context file
    rule: str  # the rule prompt that fits the context


def _read_jsonl(path: Path, what: str) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    return rows


def context_text(record: dict) -> tuple[str, str]:
    """(context text, rule prompt) for one context record, as LLaVA builds them.

    COCO (``caps_boxes_coco2014_val_80.jsonl``): captions, a blank line, then one
    ``category: bbox`` line per instance. In-the-wild (``context.jsonl``): the caption.
    """
    if "captions" in record:
        captions = "\n".join(record["captions"])
        boxes = "\n".join(f"{inst['category']}: {inst['bbox']}" for inst in record.get("instances", []))
        return f"{captions}\n\n{boxes}", RULE_COCO
    if "caption" in record:
        return str(record["caption"]), RULE_CAPTION
    raise ValueError(f"context record for {record.get('image')!r} has neither 'captions' nor 'caption'")


def load(questions: str | Path, answers: str | Path, context: str | Path | None = None) -> list[LlavaBenchItem]:
    """Items from the questions JSONL, the reference answers JSONL (by question_id) and an optional context JSONL.

    Context records are matched by image file name (LLaVA's ``image_to_context``).
    Errors name the file and the question.
    """
    qpath, apath = Path(questions), Path(answers)
    refs: dict[str, str] = {}
    for row in _read_jsonl(apath, "reference answers"):
        if "question_id" not in row or "text" not in row:
            raise ValueError(f"{apath}: answer row lacks 'question_id' or 'text': {str(row)[:120]}")
        refs[str(row["question_id"])] = row["text"]
    by_image: dict[str, dict] | None = None
    if context is not None:
        by_image = {str(row["image"]): row for row in _read_jsonl(Path(context), "context file")}

    items = []
    for row in _read_jsonl(qpath, "questions"):
        missing = [k for k in ("question_id", "image", "text", "category") if k not in row]
        if missing:
            raise ValueError(f"{qpath}: question {row.get('question_id')!r} lacks {missing}")
        qid = str(row["question_id"])
        if qid not in refs:
            raise KeyError(f"{apath}: no reference answer for question_id {qid}")
        ctx, rule = None, RULE_DEFAULT
        if by_image is not None:
            if row["image"] not in by_image:
                raise KeyError(f"{context}: no context for image {row['image']!r} (question_id {qid})")
            ctx, rule = context_text(by_image[row["image"]])
        items.append(
            LlavaBenchItem(
                sample_id=qid,
                prompt=row["text"],
                image=row["image"],
                category=row["category"],
                reference=refs[qid],
                context=ctx,
                rule=rule,
            )
        )
    return items


def judge_prompt(item: LlavaBenchItem, answer: str) -> str:
    """The judge's user message: context, question, reference as Assistant 1, ``answer`` as Assistant 2, rule."""
    head = f"[Context]\n{item.context}\n\n" if item.context is not None else ""
    return (
        f"{head}[Question]\n{item.prompt}\n\n"
        f"[{JUDGE_ROLE} 1]\n{item.reference}\n\n[End of {JUDGE_ROLE} 1]\n\n"
        f"[{JUDGE_ROLE} 2]\n{answer}\n\n[End of {JUDGE_ROLE} 2]\n\n"
        f"[System]\n{item.rule}\n\n"
    )


def judge_messages(item: LlavaBenchItem, answer: str) -> list[dict]:
    """Text-only chat request for the judge (LLaVA's GPT-4 review sends no image either)."""
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": judge_prompt(item, answer)}]


def column_name(category: str) -> str:
    """The paper's Table 3 column for a LLaVA category (Con, CR, DD); another category keeps its own name."""
    return CATEGORY_COLUMNS.get(category, category)


def parse_judge(text: str) -> tuple[float, float]:
    """(reference score, model score) from a judge reply by LLaVA's ``parse_score``; RefereeParseError otherwise.

    Exactly LLaVA's rule: the first line (``split("\\n")[0]``), commas read as
    spaces, split on single spaces, must be two fields ``float`` reads. Any
    numbers pass (0, 11, 7.5); a double or trailing space, a tab or a label
    makes it fail, as it does in LLaVA, where the reply becomes [-1, -1].
    """
    if not isinstance(text, str):
        raise RefereeParseError(f"reply is {type(text).__name__}, not text", repr(text))
    fields = text.split("\n")[0].replace(",", " ").split(" ")
    if len(fields) != 2:
        raise RefereeParseError(f"first line is not two scores ({len(fields)} fields)", text)
    try:
        return float(fields[0]), float(fields[1])
    except ValueError:
        raise RefereeParseError(f"first line is not two numbers: {fields}", text) from None


def _readable_elsewhere(text: str) -> list[float] | None:
    """Two scores the referee parser finds in a reply LLaVA's rule could not read, else None (diagnostic only)."""
    try:
        return list(parse_referee(text))
    except RefereeParseError:
        return None


def _summary(tuples: list[tuple[float, float]], unparsed: int) -> dict[str, float | int | None]:
    """One line of LLaVA's summarize_gpt_review.py: means rounded to 3 decimals, ratio x 100 to 1, means x 10 to 1.

    ``relative`` is None where LLaVA would divide by zero (reference mean 0).
    """
    if not tuples:
        return {"relative": None, "reference": None, "model": None, "n": 0, "unparsed": 0}
    ref, model = (round(x, 3) for x in np.asarray(tuples).mean(0).tolist())
    return {
        "relative": round(model / ref * 100, 1) if ref else None,
        "reference": round(ref * 10, 1),
        "model": round(model * 10, 1),
        "n": len(tuples),
        "unparsed": unparsed,
    }


def evaluate(
    items: Sequence[LlavaBenchItem], outputs: Sequence[str], judge_replies: Sequence[str]
) -> tuple[dict, list[dict]]:
    """Score (model answer, judge reply) per item, same order: (metrics, per-sample records).

    metrics: the relative score per category under its Table 3 column (Con, CR,
    DD, or the file's name) and ``AVG`` over all questions, every reply
    averaged in as LLaVA does; ``details``, keyed by LLaVA's category names and
    "all", with both means x 10 and the counts; ``n``; ``unparsed`` (replies
    averaged in as (-1, -1)) and ``unparsed_by_column`` (its nonzero counts);
    ``unparsed_readable`` (of those, replies where the referee parser finds
    two scores: a judge that scored, but not on its first line as LLaVA asks).
    A sample holds ``tuple``, the pair that was averaged (LLaVA's review field).
    """
    if not len(items) == len(outputs) == len(judge_replies):
        raise ValueError(f"{len(items)} items, {len(outputs)} outputs, {len(judge_replies)} judge replies")
    samples = []
    for item, output, reply in zip(items, outputs, judge_replies):
        sample: dict[str, Any] = {
            "id": item.sample_id,
            "prompt": item.prompt,
            "image": item.image,
            "category": item.category,
            "output": output,
            "judge_reply": reply,
            "parsed": None,
            "error": None,
        }
        try:
            scores = parse_judge(reply)
            sample.update(parsed=list(scores), reference_score=scores[0], model_score=scores[1])
        except RefereeParseError as err:
            scores = UNPARSED_SCORES
            sample.update(error=err.reason, readable_elsewhere=_readable_elsewhere(reply))
        sample["tuple"] = list(scores)
        samples.append(sample)

    def summary(rows: list[dict]) -> dict:
        return _summary([tuple(s["tuple"]) for s in rows], sum(s["parsed"] is None for s in rows))

    categories = sorted({s["category"] for s in samples})
    category_of: dict[str, str] = {}  # table column -> LLaVA category
    for category in categories:
        column = column_name(category)
        if column in category_of:
            raise ValueError(f"categories {category_of[column]!r} and {category!r} are both Table 3's {column}")
        category_of[column] = category
    columns = [c for c in TABLE3_COLUMNS if c in category_of] + [c for c in category_of if c not in TABLE3_COLUMNS]

    details = {category: summary([s for s in samples if s["category"] == category]) for category in categories}
    details["all"] = summary(samples)
    result: dict[str, Any] = {column: details[category_of[column]]["relative"] for column in columns}
    result[OVERALL] = details["all"]["relative"]
    unparsed = [s for s in samples if s["parsed"] is None]
    by_column = {column: details[category_of[column]]["unparsed"] for column in columns}
    result.update(
        details=details,
        n=len(samples),
        unparsed=len(unparsed),
        unparsed_by_column={column: count for column, count in by_column.items() if count},
        unparsed_readable=sum(s["readable_elsewhere"] is not None for s in unparsed),
    )
    return result, samples


__all__ = [
    "CATEGORY_COLUMNS",
    "JUDGE_SYSTEM",
    "LlavaBenchItem",
    "OVERALL",
    "RULE_CAPTION",
    "RULE_COCO",
    "RULE_DEFAULT",
    "TABLE3_COLUMNS",
    "UNPARSED_SCORES",
    "column_name",
    "context_text",
    "evaluate",
    "judge_messages",
    "judge_prompt",
    "load",
    "parse_judge",
]
