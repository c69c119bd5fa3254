"""SEED-Bench, image part (paper Table 2, "SEED-IMG"): read the question file, prompt, score per dimension.

Computed as LLaVA's ``convert_seed_for_submission.py`` computes it, so the
numbers compare with the paper and with LLaVA's published SEED scores:

- only questions with ``data_type == "image"`` (the 9 image dimensions);
- the prompt is the question, the four choices as ``"A. ..."`` lines, then
  ``ANSWER_SUFFIX`` (LLaVA's ``llava-seed-bench.jsonl``);
- a reply is correct iff, stripped, it *is* the answer letter (LLaVA compares
  ``text == answer``); anything that is not one of A-D is *failed*, counted
  wrong and reported;
- accuracy per dimension and overall over all image questions (micro average),
  in percent with two decimals.

Dimension names come from the file's ``question_type`` map (name -> id), never
from a list of our own: a renamed or added dimension shows up as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdc.eval.report import read_json

ANSWER_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = ("A", "B", "C", "D")
OVERALL = "Avg"
_FIELDS = (
    "question_id",
    "question",
    "choice_a",
    "choice_b",
    "choice_c",
    "choice_d",
    "answer",
    "data_id",
    "data_type",
    "question_type_id",
)


@dataclass(frozen=True)
class SeedItem:
    """One image question."""

    sample_id: str  # SEED's question_id
    prompt: str
    image: str  # data_id: the file name inside the SEED-Bench-image folder
    answer: str  # "A" .. "D"
    dimension: str  # the question_type name from the file


def build_prompt(question: str, choices: Sequence[str]) -> str:
    """Question, lettered choices, then the answer instruction, one per line (LLaVA's SEED prompt)."""
    lines = [question.strip()] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices)]
    return "\n".join(lines + [ANSWER_SUFFIX])


def parse_answer(text: str) -> str | None:
    """The reply's letter if the stripped reply is exactly one of A-D (LLaVA's rule), else None (failed)."""
    if not isinstance(text, str):
        raise TypeError(f"reply must be a str, got {type(text).__name__}")
    reply = text.strip()
    return reply if reply in LETTERS else None


def load(data: str | Path) -> tuple[list[SeedItem], list[str]]:
    """(image questions in file order, dimension names in id order) from ``SEED-Bench.json``.

    The dimension list holds every type that has an image question; errors name
    the file and the question.
    """
    path = Path(data)
    raw = read_json(path, "SEED-Bench question file")
    if not isinstance(raw, dict) or "questions" not in raw or "question_type" not in raw:
        raise ValueError(f"{path}: expected an object with 'questions' and 'question_type'")
    names = {int(type_id): name for name, type_id in raw["question_type"].items()}

    items = []
    for index, q in enumerate(raw["questions"]):
        missing = [field for field in _FIELDS if field not in q]
        if missing:
            raise ValueError(f"{path}: question {index} (id {q.get('question_id')!r}) lacks {missing}")
        if q["data_type"] != "image":
            continue
        type_id = int(q["question_type_id"])
        if type_id not in names:
            raise KeyError(
                f"{path}: question {q['question_id']!r} has question_type_id {type_id} missing from 'question_type'"
            )
        if q["answer"] not in LETTERS:
            raise ValueError(f"{path}: question {q['question_id']!r} has answer {q['answer']!r}, not one of A-D")
        choices = [q[f"choice_{c}"] for c in "abcd"]
        items.append(
            SeedItem(
                sample_id=str(q["question_id"]),
                prompt=build_prompt(q["question"], choices),
                image=str(q["data_id"]),
                answer=q["answer"],
                dimension=names[type_id],
            )
        )
    order = {name: type_id for type_id, name in names.items()}
    dimensions = sorted({item.dimension for item in items}, key=order.__getitem__)
    return items, dimensions


def evaluate(
    items: Sequence[SeedItem], outputs: Sequence[str], dimensions: Sequence[str] | None = None
) -> tuple[dict, list[dict]]:
    """Score raw replies (one per item, same order): (metrics, per-sample records).

    metrics: one accuracy per dimension (in ``dimensions`` order, default: first
    seen), ``Avg`` over all questions, and ``n``, ``correct``, ``failed``.
    """
    if len(items) != len(outputs):
        raise ValueError(f"{len(items)} items but {len(outputs)} outputs")
    samples = []
    for item, output in zip(items, outputs):
        parsed = parse_answer(output)
        samples.append(
            {
                "id": item.sample_id,
                "prompt": item.prompt,
                "image": item.image,
                "output": output,
                "parsed": parsed,
                "answer": item.answer,
                "correct": parsed == item.answer,
                "failed": parsed is None,
                "dimension": item.dimension,
            }
        )
    order = list(dimensions) if dimensions is not None else list(dict.fromkeys(s["dimension"] for s in samples))
    result: dict[str, Any] = {}
    for name in order:
        flags = [s["correct"] for s in samples if s["dimension"] == name]
        result[name] = round(100.0 * sum(flags) / len(flags), 2) if flags else None
    total = [s["correct"] for s in samples]
    result[OVERALL] = round(100.0 * sum(total) / len(total), 2) if total else None
    result.update(n=len(samples), correct=sum(total), failed=sum(s["failed"] for s in samples))
    return result, samples


__all__ = ["ANSWER_SUFFIX", "OVERALL", "SeedItem", "build_prompt", "evaluate", "load", "parse_answer"]
