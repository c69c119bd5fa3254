"""LLaVA-Bench / "LLaVA Test Set" (paper Table 3): a judge scores (reference, model) answer pairs.

Follows LLaVA's ``eval_gpt_review_visual.py`` / ``eval_gpt_review_bench.py`` and
``summarize_gpt_review.py`` so scores compare with the paper (rated by GPT-4):

- the judge sees the context (COCO: five captions and the boxes; in-the-wild: a
  caption), the question, Assistant 1 = the reference answer, Assistant 2 = the
  model's answer, and LLaVA's rule prompt asking for the two scores on the first line;
- per category and over all questions: relative score = mean(model) / mean(reference)
  x 100, reported with both means x 10 (means rounded to 3 decimals first, ratio to 1,
  as ``summarize_gpt_review.py`` does);
- a judge reply is read by LLaVA's first-line rule, then by the referee parser
  (``mmdc.actors.roles.parse_referee``) as a fallback. A reply neither can read,
  or a score outside 1..10, is *unparsed*: counted and reported and left out of
  the means (LLaVA would average in a -1, which silently drags a score down).

The judge is any engine: it is sent text-only chat requests (``judge_messages``),
which a LLaVA checkpoint, a text LLM or an OpenAI-compatible endpoint all accept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mmdc.actors.roles import RefereeParseError, parse_referee

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
_RULE_HEAD = ("We would like to request your feedback on the performance of two AI assistants in response to the "
              "user question displayed above.")
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

# Paper Table 3 names for LLaVA's categories; "all" is LLaVA's pooled score over every question.
CATEGORY_COLUMNS = {"conv": "Con", "complex": "CR", "detail": "DD"}
OVERALL = "AVG"


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
        boxes = "\n".join(f'{inst["category"]}: {inst["bbox"]}' for inst in record.get("instances", []))
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
        items.append(LlavaBenchItem(sample_id=qid, prompt=row["text"], image=row["image"], category=row["category"],
                                    reference=refs[qid], context=ctx, rule=rule))
    return items


def judge_prompt(item: LlavaBenchItem, answer: str) -> str:
    """The judge's user message: context, question, reference as Assistant 1, ``answer`` as Assistant 2, rule."""
    head = f"[Context]\n{item.context}\n\n" if item.context is not None else ""
    return (f"{head}[Question]\n{item.prompt}\n\n"
            f"[{JUDGE_ROLE} 1]\n{item.reference}\n\n[End of {JUDGE_ROLE} 1]\n\n"
            f"[{JUDGE_ROLE} 2]\n{answer}\n\n[End of {JUDGE_ROLE} 2]\n\n"
            f"[System]\n{item.rule}\n\n")


def judge_messages(item: LlavaBenchItem, answer: str) -> list[dict]:
    """Text-only chat request for the judge (LLaVA's GPT-4 review sends no image either)."""
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": judge_prompt(item, answer)}]


def parse_judge(text: str) -> tuple[tuple[float, float], str]:
    """((reference score, model score), how) from a judge reply; raises RefereeParseError when unreadable.

    ``how`` is "first_line" for LLaVA's rule (the first line, commas read as
    spaces, is exactly two numbers) or "fallback" when ``parse_referee`` found
    them elsewhere. Scores must lie in 1..10.
    """
    if not isinstance(text, str):
        raise RefereeParseError(f"reply is {type(text).__name__}, not text", repr(text))
    fields = text.split("\n")[0].replace(",", " ").split()
    if len(fields) == 2:
        try:
            pair = (float(fields[0]), float(fields[1]))
        except ValueError:
            pair = None
        if pair is not None:
            if not all(1.0 <= s <= 10.0 for s in pair):
                raise RefereeParseError(f"score outside 1..10 on the first line: {fields}", text)
            return pair, "first_line"
    return parse_referee(text), "fallback"


def _summary(pairs: list[tuple[float, float]]) -> dict[str, float | int | None]:
    """LLaVA's summarize_gpt_review: means rounded to 3 decimals, ratio x 100 to 1, means x 10 to 1."""
    if not pairs:
        return {"relative": None, "reference": None, "model": None, "n": 0}
    ref = round(sum(p[0] for p in pairs) / len(pairs), 3)
    model = round(sum(p[1] for p in pairs) / len(pairs), 3)
    return {"relative": round(model / ref * 100, 1), "reference": round(ref * 10, 1), "model": round(model * 10, 1),
            "n": len(pairs)}


def evaluate(items: Sequence[LlavaBenchItem], outputs: Sequence[str],
             judge_replies: Sequence[str]) -> tuple[dict, list[dict]]:
    """Score (model answer, judge reply) per item, same order: (metrics, per-sample records).

    metrics: the relative score per category under its Table 3 name (Con, CR,
    DD, or the file's name) and ``AVG`` over all scored questions; ``details``
    with both means x 10 and counts per category; ``n``, ``unparsed``, and
    ``fallback`` (replies LLaVA's first-line rule could not read but
    ``parse_referee`` could: worth a look, since LLaVA would have failed them).
    """
    if not len(items) == len(outputs) == len(judge_replies):
        raise ValueError(f"{len(items)} items, {len(outputs)} outputs, {len(judge_replies)} judge replies")
    samples = []
    for item, output, reply in zip(items, outputs, judge_replies):
        sample: dict[str, Any] = {"id": item.sample_id, "prompt": item.prompt, "image": item.image,
                                  "category": item.category, "output": output, "judge_reply": reply,
                                  "parsed": None, "parse": None, "error": None}
        try:
            scores, how = parse_judge(reply)
            sample.update(parsed=list(scores), parse=how, reference_score=scores[0], model_score=scores[1])
        except RefereeParseError as err:
            sample["error"] = err.reason
        samples.append(sample)

    scored = [s for s in samples if s["parsed"] is not None]
    details: dict[str, dict] = {}
    for category in sorted({s["category"] for s in samples}):
        details[category] = _summary([tuple(s["parsed"]) for s in scored if s["category"] == category])
    details["all"] = _summary([tuple(s["parsed"]) for s in scored])
    result: dict[str, Any] = {}
    known = [c for c in CATEGORY_COLUMNS if c in details]  # paper order: Con, CR, DD
    for category in known + [c for c in details if c not in CATEGORY_COLUMNS and c != "all"]:
        result[CATEGORY_COLUMNS.get(category, category)] = details[category]["relative"]
    result[OVERALL] = details["all"]["relative"]
    result.update(details=details, n=len(samples), unparsed=len(samples) - len(scored),
                  fallback=sum(s["parse"] == "fallback" for s in scored))
    return result, samples


__all__ = ["JUDGE_SYSTEM", "LlavaBenchItem", "OVERALL", "RULE_CAPTION", "RULE_COCO", "RULE_DEFAULT", "context_text",
           "evaluate", "judge_messages", "judge_prompt", "load", "parse_judge"]
