"""Read LLaVA-Instruct conversation files and unfold them into the seed pool D_sin.

Handles the real ``llava_instruct_80k.json`` / ``llava_instruct_150k.json``
(a JSON list) and the same records one per line (``.jsonl``), read as bytes
(``mmdc.data.jsonfiles``: a byte that is not UTF-8 costs its record, not the
file). A file that is not LLaVA at all fails at once with the file and record
index or byte offset; a few broken records in a good file are returned as skips
with reasons (``strict=False``), never dropped silently, so a run report can say
exactly what was left out. Stage 1's caption pairs are read the same way.

Unfolding (paper Eq. 4): every human turn becomes one single-turn row with its
answer removed; the paper turns 80K conversations into 220K such questions.

Duplicate record ids: the real 150K file reuses an image's id for its
conversation, detail and reasoning records. A record whose id was seen before
but whose questions differ gets source id ``"<id>#<k>"`` (k = 1, 2, ... in
file order), so its questions keep distinct, deterministic instruction ids;
an exact repeat (same id, same question at the same turn) is skipped as a
duplicate.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from mmdc.data.jsonfiles import JsonFileError, JsonRecord, read_json_records
from mmdc.data.schema import pool_table, seed_instruction_id

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"


class LlavaFormatError(ValueError):
    """A file (or, in strict mode, one record) that is not LLaVA-Instruct format."""

    def __init__(self, path: str | Path, index: int | None, reason: str) -> None:
        where = f"{path}" if index is None else f"{path}, record {index}"
        super().__init__(f"{where}: {reason}")
        self.path = str(path)
        self.index = index
        self.reason = reason

    def __reduce__(self):  # rebuilt from its fields when it crosses Ray
        return type(self), (self.path, self.index, self.reason)


@dataclass
class LoadResult:
    """Valid records in file order, and one skip dict per rejected record: {"path", "index", "id", "reason"}, with
    "line" (JSON Lines) or "offset" (bytes into a JSON list) where the reader knows it."""

    records: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def record_problem(record: Any) -> str | None:
    """Why ``record`` is not a usable LLaVA-Instruct record, or None when it is.

    Usable: a dict with a str/int ``id``, a non-empty str ``image`` and a
    ``conversations`` list of {"from", "value"} turns alternating human, gpt,
    human, gpt, ... (even length), with <image> in the first human turn.
    Extra keys (on the record or on turns) are allowed.
    """
    if not isinstance(record, dict):
        return f"expected an object, got {type(record).__name__}"
    missing = [key for key in ("id", "image", "conversations") if key not in record]
    if missing:
        return f"missing key(s) {missing}"
    if isinstance(record["id"], bool) or not isinstance(record["id"], (str, int)) or str(record["id"]) == "":
        return f"'id' must be a non-empty string or integer, got {record['id']!r}"
    if not isinstance(record["image"], str) or not record["image"].strip():
        return f"'image' must be a non-empty string, got {record['image']!r}"
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        return "'conversations' must be a non-empty list"
    if len(turns) % 2:
        return f"'conversations' has {len(turns)} turns; human/gpt turns must come in pairs"
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return f"conversations[{position}] must be an object with 'from' and 'value'"
        expected = "human" if position % 2 == 0 else "gpt"
        if turn["from"] != expected:
            return (
                f"conversations[{position}] is from {turn['from']!r}, expected {expected!r} (turns alternate human/gpt)"
            )
        if not isinstance(turn["value"], str):
            return f"conversations[{position}]['value'] must be a string"
    if IMAGE_TOKEN not in turns[0]["value"]:
        return f"the first human turn has no {IMAGE_TOKEN} placeholder"
    return None


def _read_raw(path: Path) -> list[JsonRecord]:
    """Every record of a .json list or a .jsonl file, with its location and its problem, if any (jsonfiles)."""
    try:
        records = read_json_records(path)
    except JsonFileError as err:
        where = "" if err.offset is None else f" at byte offset {err.offset}"
        raise LlavaFormatError(path, None, f"{err.reason}{where}") from None
    if path.suffix.lower() == ".jsonl" and records and all(r.problem for r in records):
        raise LlavaFormatError(path, None, f"not JSON Lines: no line parses as JSON (first: {records[0].problem})")
    return records


def _skip(path: Path, record: JsonRecord, reason: str) -> dict:
    """A skip record: the file, where in it (index, and line or byte offset), the record's id when it has one."""
    record_id = record.value.get("id") if isinstance(record.value, dict) else None
    return {"path": str(path), **record.where(), "id": record_id, "reason": reason}


def load_llava_records(path: str | Path, strict: bool = True) -> LoadResult:
    """Load and validate LLaVA-Instruct records from a .json list or a .jsonl file.

    strict=True: the first bad record raises LlavaFormatError(path, index, reason).
    strict=False: bad records (not JSON, not UTF-8, not LLaVA) come back in ``skipped``; the file still
    raises when it is not JSON / not a list, or when it has records but none of them is LLaVA format
    (that is a wrong file, not a few bad records).
    """
    path = Path(path)
    result = LoadResult()
    for record in _read_raw(path):
        reason = record.problem or record_problem(record.value)
        if reason is None:
            result.records.append(record.value)
            continue
        if strict:
            raise LlavaFormatError(path, record.index, reason)
        result.skipped.append(_skip(path, record, reason))
    if result.skipped and not result.records:
        first = result.skipped[0]
        raise LlavaFormatError(path, first["index"], f"no record is in LLaVA format; first problem: {first['reason']}")
    if result.skipped:
        log.warning(
            "%s: skipped %d of %d records (see LoadResult.skipped)",
            path,
            len(result.skipped),
            len(result.skipped) + len(result.records),
        )
    return result


def image_position(first_value: str) -> str:
    """ "before" when <image> precedes the question text ("<image>\\nQ"), "after" otherwise ("Q\\n<image>")."""
    head = first_value.split(IMAGE_TOKEN, 1)[0]
    return "before" if not head.strip() else "after"


def clean_question(value: str) -> str:
    """The question with every <image> placeholder removed and surrounding whitespace stripped."""
    return value.replace(IMAGE_TOKEN, "").strip()


def _image_ref(image: str, image_root: str | Path | None) -> str:
    """The record's image joined onto ``image_root`` (absolute paths and no root leave it as is)."""
    if image_root is None or os.path.isabs(image):
        return image
    return os.path.join(os.fspath(image_root), image)


def unfold_single_turn(records: list[dict], image_root: str | Path | None = None) -> tuple[pa.Table, list[dict]]:
    """Unfold conversations into seed pool rows (one per human turn, answers dropped) and skips.

    Each skip is {"id", "turn", "reason"}. Skipped: a record that fails
    ``record_problem``, an empty / whitespace-only question, an exact repeat
    of (id, turn, question). See the module docstring for repeated ids.
    """
    rows: list[dict] = []
    skipped: list[dict] = []
    questions_by_id: dict[str, list[list[str]]] = {}  # id -> question lists of the records using it
    seen_turn: dict[tuple[str, int, str], str] = {}  # (id, turn, question) -> source_id that holds it
    for index, record in enumerate(records):
        problem = record_problem(record)
        if problem is not None:
            record_id = record.get("id") if isinstance(record, dict) else None
            skipped.append({"id": record_id, "turn": None, "reason": f"record {index}: {problem}"})
            continue
        record_id = str(record["id"])
        human_values = [turn["value"] for turn in record["conversations"][::2]]
        questions = [clean_question(value) for value in human_values]
        earlier = questions_by_id.setdefault(record_id, [])
        source_id = record_id if not earlier else f"{record_id}#{len(earlier)}"
        earlier.append(questions)
        image_id = os.path.splitext(os.path.basename(record["image"]))[0]
        image = _image_ref(record["image"], image_root)
        for turn, question in enumerate(questions):
            if not question:
                skipped.append({"id": record_id, "turn": turn, "reason": "empty question after removing <image>"})
                continue
            key = (record_id, turn, question)
            if key in seen_turn:
                skipped.append(
                    {
                        "id": record_id,
                        "turn": turn,
                        "reason": f"duplicate of source {seen_turn[key]!r} turn {turn} (same id, turn and question)",
                    }
                )
                continue
            seen_turn[key] = source_id
            rows.append(
                {
                    "instruction_id": seed_instruction_id(source_id, turn),
                    "image_id": image_id,
                    "image": image,
                    "question": question,
                    "origin": "seed",
                    "parent_id": None,
                    "iteration": 0,
                    "turn": turn,
                    "image_position": image_position(human_values[0]) if turn == 0 else "none",
                    "source_id": source_id,
                }
            )
    renamed = sum(len(lists) - 1 for lists in questions_by_id.values())
    if renamed:
        log.info("%d record(s) reuse an earlier record's id; their source ids carry a #k suffix", renamed)
    return pool_table(rows), skipped


def caption_problem(record: Any) -> tuple[dict | None, str | None]:
    """``({id, image, caption}, None)`` for a usable caption record, ``(None, reason)`` otherwise."""
    if not isinstance(record, dict):
        return None, f"expected an object, got {type(record).__name__}"
    if not isinstance(record.get("image"), str) or not record["image"].strip():
        return None, "a caption pair needs a non-empty 'image' string"
    caption = record.get("caption")
    if caption is None and isinstance(record.get("conversations"), list):
        gpt = [t.get("value") for t in record["conversations"] if isinstance(t, dict) and t.get("from") == "gpt"]
        caption = gpt[0] if gpt else None
    if not isinstance(caption, str) or not caption.strip():
        return None, "no caption (neither 'caption' nor a gpt turn)"
    return {
        "id": str(record["id"]) if "id" in record else None,
        "image": record["image"],
        "caption": caption.strip(),
    }, None


def load_caption_pairs(path: str | Path) -> LoadResult:
    """Stage 1 caption pairs as ``{id, image, caption}`` records, and the skipped ones with their reasons.

    Accepts our plain format (``{id, image, caption}``, what the synthetic world writes) and LLaVA's
    pretraining format (``{id, image, conversations}`` whose gpt turn is the caption, e.g.
    blip_laion_cc_sbu_558k.json), as a JSON list or JSON Lines (``.jsonl``). A record that is neither, or
    that is not JSON or not UTF-8, is a skip naming the file and where in it; a pair without an id gets its
    index. A file that cannot be read, is not JSON, or has records but no usable one raises
    ``LlavaFormatError`` naming the file.
    """
    path = Path(path)
    result = LoadResult()
    for record in _read_raw(path):
        pair, reason = (None, record.problem) if record.problem else caption_problem(record.value)
        if pair is None:
            result.skipped.append(_skip(path, record, reason))
            continue
        if pair["id"] is None:
            pair["id"] = str(record.index)
        result.records.append(pair)
    if result.skipped and not result.records:
        first = result.skipped[0]
        raise LlavaFormatError(path, first["index"], f"no record is a caption pair; first problem: {first['reason']}")
    return result
