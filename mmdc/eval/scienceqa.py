"""ScienceQA (paper Table 1): read LLaVA's converted files, prompt, parse answers, score by category.

Our numbers must be comparable with the paper's Table 1 and with LLaVA's own
``llava/eval/eval_science_qa.py``, so this module copies their rules instead of
inventing friendlier ones:

- the prompt is the first human turn with ``<image>`` removed and stripped, then
  a new line and ``ANSWER_SUFFIX`` (LLaVA's ``model_vqa_science.py --single-pred-prompt``);
- a reply is parsed by LLaVA's three rules (``parse_answer``); anything else, or a
  letter beyond the question's choices, is *failed*: counted wrong, as in LLaVA, whose
  ``get_pred_idx`` returns -1 there (the ``random.choice`` after that return is never
  reached), and counted in ``failed``;
- categories come from the official ``problems.json`` exactly as ScienceQA's own
  ``get_scores`` computes them: subject NAT/SOC/LAN, TXT = non-empty hint,
  IMG = has an image, NO = neither, G1-6 / G7-12 by grade.

Without ``problems.json`` only ``Avg`` is reported: the converted file holds no
subject or grade. The model and the data never meet here: ``load`` gives items,
the caller turns prompts into requests, ``evaluate`` scores the raw replies.
``load_train`` reads the train split as conversation rows for Table 1's fine-tuning
(``mmdc.eval.finetune``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdc.eval.report import read_json

ANSWER_SUFFIX = "Answer with the option's letter from the given choices directly."
OPTIONS = ("A", "B", "C", "D", "E")  # LLaVA's --options default: ScienceQA has at most 5 choices
IMAGE_TOKEN = "<image>"

# Paper Table 1 column order; "Avg" is the paper's "Average".
COLUMNS = ("Avg", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
SUBJECTS = {"NAT": "natural science", "SOC": "social science", "LAN": "language science"}
GRADES_1_6 = frozenset(f"grade{g}" for g in range(1, 7))
GRADES_7_12 = frozenset(f"grade{g}" for g in range(7, 13))

# LLaVA: re.compile(r'The answer is ([A-Z]).') with exactly one match. The "." is any character, so
# "The answer is B" at the very end of a reply does NOT match there; we keep that to stay comparable.
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
_OPTION_LINE = re.compile(r"^([A-E])\. ", re.MULTILINE)


@dataclass(frozen=True)
class ScienceQAItem:
    """One test question; category fields are None without problems.json."""

    sample_id: str  # the ScienceQA problem id (LLaVA's "id")
    prompt: str  # exactly what the student is asked
    image: str | None  # path relative to the image folder, None for text-only questions
    answer: str  # the correct letter
    n_choices: int
    subject: str | None = None  # "natural science" | "social science" | "language science"
    hint: str | None = None  # the ScienceQA "hint" (the "Context: ..." text); TXT iff non-empty
    has_image: bool | None = None  # problems.json "image" is set
    grade: str | None = None  # "grade1" .. "grade12"


def parse_answer(text: str, n_choices: int) -> str | None:
    """The chosen letter in a reply by LLaVA's rules, or None when it fails.

    In order: the whole (stripped) reply is one option letter; it starts with
    ``"X. "``; it contains ``"The answer is X."`` exactly once. A letter beyond
    the question's ``n_choices`` fails too (LLaVA's ``get_pred_idx``).
    """
    if not isinstance(text, str):
        raise TypeError(f"reply must be a str, got {type(text).__name__}")
    if not 1 <= n_choices <= len(OPTIONS):
        raise ValueError(f"n_choices must be in 1..{len(OPTIONS)}, got {n_choices}")
    reply = text.strip()
    if reply in OPTIONS:
        letter: str | None = reply
    elif len(reply) >= 3 and reply[0] in OPTIONS and reply[1:3] == ". ":
        letter = reply[0]
    else:
        found = _THE_ANSWER_IS.findall(reply)
        letter = found[0] if len(found) == 1 else None
    if letter is None or letter not in OPTIONS[:n_choices]:
        return None
    return letter


def build_prompt(human_turn: str) -> str:
    """The student's prompt from LLaVA's first human turn (model_vqa_science.py, single-pred prompt)."""
    return human_turn.replace(IMAGE_TOKEN, "").strip() + "\n" + ANSWER_SUFFIX


def _first_turns(record: dict, path: Path, index: int) -> tuple[str, str | None]:
    """(first human turn, first gpt turn or None) of one converted record."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{path}: record {index} (id {record.get('id')!r}) has no 'conversations'")
    human = next((t.get("value") for t in turns if t.get("from") == "human"), None)
    gpt = next((t.get("value") for t in turns if t.get("from") == "gpt"), None)
    if not isinstance(human, str):
        raise ValueError(f"{path}: record {index} (id {record.get('id')!r}) has no human turn")
    return human, gpt if isinstance(gpt, str) else None


def load(
    data: str | Path,
    problems: str | Path | None = None,
    pid_splits: str | Path | None = None,
    split: str = "test",
) -> list[ScienceQAItem]:
    """Items of LLaVA's converted ScienceQA file (e.g. ``llava_test_CQM-A.json``), in file order.

    With ``problems`` (the official problems.json) the answer and the number of
    choices come from there and the categories are filled; otherwise the answer is
    the gpt turn (a letter, or "The answer is X.") and the choices are the
    ``"A. ..."`` lines of the prompt. With ``pid_splits`` only ids of ``split``
    are kept. Errors name the file and the record.
    """
    path = Path(data)
    records = read_json(path, "ScienceQA data file")
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {{id, image?, conversations}} records")
    meta = read_json(Path(problems), "problems.json") if problems is not None else None
    keep: set[str] | None = None
    if pid_splits is not None:
        splits = read_json(Path(pid_splits), "pid_splits.json")
        if split not in splits:
            raise KeyError(f"{pid_splits}: no split {split!r} (has {sorted(splits)})")
        keep = {str(pid) for pid in splits[split]}

    items = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f"{path}: record {index} has no 'id'")
        pid = str(record["id"])
        if keep is not None and pid not in keep:
            continue
        human, gpt = _first_turns(record, path, index)
        prompt = build_prompt(human)
        image = record.get("image") or None
        if meta is not None:
            if pid not in meta:
                raise KeyError(f"{problems}: no problem {pid!r} (record {index} of {path})")
            prob = meta[pid]
            n_choices = len(prob["choices"])
            answer = OPTIONS[int(prob["answer"])]
            if gpt is not None:
                stated = parse_answer(gpt, n_choices)
                if stated is not None and stated != answer:
                    raise ValueError(f"{path}: record {pid!r} answers {stated} but {problems} says {answer}")
            items.append(
                ScienceQAItem(
                    sample_id=pid,
                    prompt=prompt,
                    image=image,
                    answer=answer,
                    n_choices=n_choices,
                    subject=prob.get("subject"),
                    hint=prob.get("hint") or "",
                    has_image=bool(prob.get("image")),
                    grade=prob.get("grade"),
                )
            )
            continue
        letters = _OPTION_LINE.findall(human)
        if not letters or letters != list(OPTIONS[: len(letters)]):
            raise ValueError(f"{path}: record {pid!r} has no 'A. ...' option lines (found {letters})")
        answer_letter = parse_answer(gpt, len(letters)) if gpt is not None else None
        if answer_letter is None:
            raise ValueError(
                f"{path}: record {pid!r} has no readable answer letter in its gpt turn ({gpt!r}); "
                "pass problems.json for the ground truth"
            )
        items.append(
            ScienceQAItem(sample_id=pid, prompt=prompt, image=image, answer=answer_letter, n_choices=len(letters))
        )
    return items


@dataclass
class TrainSet:
    """ScienceQA's train split as stage 2 conversation rows, and the records left out with their reasons.

    A row is ``{"conversation_id", "image", "questions", "answers"}`` with ``image`` relative to the
    image folder, or None for a text-only question (about half of ScienceQA: trained without an image,
    as LLaVA does); the questions carry no ``<image>`` (the trainer places it, paper Eq. 2).
    """

    rows: list[dict]
    skipped: list[dict]  # {"path", "index", "id", "reason"}, as ``mmdc.data.llava`` records a skip

    @property
    def stats(self) -> dict[str, int]:
        with_image = sum(row["image"] is not None for row in self.rows)
        return {
            "rows": len(self.rows),
            "with_image": with_image,
            "text_only": len(self.rows) - with_image,
            "skipped": len(self.skipped),
        }


def _train_turns(record: Any) -> tuple[list[str], list[str]] | str:
    """(questions, answers) of one converted train record, ``<image>`` removed, or why it cannot be used."""
    if not isinstance(record, dict) or record.get("id") in (None, ""):
        return "no 'id'"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        return "'conversations' must be a non-empty list of human/gpt pairs"
    questions, answers = [], []
    for position, turn in enumerate(turns):
        expected = "human" if position % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            return f"conversations[{position}] must be a {expected!r} turn with a string 'value'"
        text = turn["value"]
        if expected == "gpt" and IMAGE_TOKEN in text:
            return f"conversations[{position}]: an answer contains {IMAGE_TOKEN}"
        text = text.replace(IMAGE_TOKEN, "").strip()
        if not text:
            return f"conversations[{position}] is empty"
        (questions if expected == "human" else answers).append(text)
    if not record.get("image") and IMAGE_TOKEN in turns[0]["value"]:
        return f"the first human turn has {IMAGE_TOKEN} but the record names no 'image'"
    return questions, answers


def load_train(data: str | Path, images: str | Path, max_image_pixels: int = 40_000_000) -> TrainSet:
    """ScienceQA's train split in LLaVA's converted format (``llava_train_QCM-LEA.json``) as conversation rows.

    LLaVA's ``convert_sqa_to_llava.py`` writes ``{"id", "image"?, "conversations"}`` records: the question with
    context and options in the human turn (``\n<image>`` at its end when there is an image), the lecture,
    solution and "The answer is X." in the gpt turn. Every image is opened here, before a trainer starts, so a
    missing or broken one is a recorded skip instead of a crash mid-training; so are malformed records and
    repeated ids. The file itself must be a JSON list.
    """
    from mmdc.data.images import ImageError, load_image, resolve_image

    path = Path(data)
    records = read_json(path, "ScienceQA train file")
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {{id, image?, conversations}} records")
    rows: list[dict] = []
    skipped: list[dict] = []
    seen: set[str] = set()
    for index, record in enumerate(records):
        turns = _train_turns(record)
        record_id = record.get("id") if isinstance(record, dict) else None
        image = (record.get("image") or None) if isinstance(record, dict) else None
        reason = turns if isinstance(turns, str) else None
        if reason is None and str(record_id) in seen:
            reason = f"duplicate id {record_id!r}"
        if reason is None and image is not None:
            try:
                load_image(resolve_image(str(image), str(images)), max_pixels=max_image_pixels)
            except ImageError as err:
                reason = str(err)
        if reason is not None:
            skipped.append({"path": str(path), "index": index, "id": record_id, "reason": reason})
            continue
        seen.add(str(record_id))
        questions, answers = turns
        rows.append(
            {
                "conversation_id": str(record_id),
                "image": str(image) if image is not None else None,
                "questions": questions,
                "answers": answers,
            }
        )
    if records and not rows:
        raise ValueError(
            f"{path}: no usable train record; first problem: record {skipped[0]['index']}: {skipped[0]['reason']}"
        )
    return TrainSet(rows, skipped)


def _percent(flags: Sequence[bool]) -> float | None:
    """Accuracy in percent with two decimals, None for an empty category (shown as '-')."""
    return round(100.0 * sum(flags) / len(flags), 2) if flags else None


def metrics(samples: Sequence[dict]) -> dict[str, float | None]:
    """Table 1 accuracies from scored samples (``correct`` plus the category fields of ``ScienceQAItem``).

    Same definitions as ScienceQA's ``get_scores``. Category columns are only
    present when the samples carry categories (problems.json was given).
    """
    out: dict[str, float | None] = {"Avg": _percent([s["correct"] for s in samples])}
    if not samples or samples[0].get("subject") is None:
        return out
    for column, subject in SUBJECTS.items():
        out[column] = _percent([s["correct"] for s in samples if s["subject"] == subject])
    out["TXT"] = _percent([s["correct"] for s in samples if s["hint"]])
    out["IMG"] = _percent([s["correct"] for s in samples if s["has_image"]])
    out["NO"] = _percent([s["correct"] for s in samples if not s["hint"] and not s["has_image"]])
    out["G1-6"] = _percent([s["correct"] for s in samples if s["grade"] in GRADES_1_6])
    out["G7-12"] = _percent([s["correct"] for s in samples if s["grade"] in GRADES_7_12])
    return {column: out.get(column) for column in COLUMNS}


def evaluate(items: Sequence[ScienceQAItem], outputs: Sequence[str]) -> tuple[dict, list[dict]]:
    """Score raw replies (one per item, same order): (metrics, per-sample records).

    metrics holds the Table 1 columns plus ``n``, ``correct`` and ``failed``
    (replies no rule could read: counted wrong).
    """
    if len(items) != len(outputs):
        raise ValueError(f"{len(items)} items but {len(outputs)} outputs")
    samples = []
    for item, output in zip(items, outputs):
        parsed = parse_answer(output, item.n_choices)
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
                "subject": item.subject,
                "hint": item.hint,
                "has_image": item.has_image,
                "grade": item.grade,
            }
        )
    result: dict[str, Any] = dict(metrics(samples))
    result.update(n=len(samples), correct=sum(s["correct"] for s in samples), failed=sum(s["failed"] for s in samples))
    return result, samples


__all__ = [
    "ANSWER_SUFFIX",
    "COLUMNS",
    "ScienceQAItem",
    "TrainSet",
    "build_prompt",
    "evaluate",
    "load",
    "load_train",
    "metrics",
    "parse_answer",
]
