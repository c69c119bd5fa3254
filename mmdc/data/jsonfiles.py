"""Input files in JSON and JSON Lines, read as bytes so that one bad byte costs one record, never the file.

JSON Lines are split on ``\\n`` only: ``str.splitlines`` also breaks on U+2028, U+2029, U+0085 and a few
control characters, which are legal inside a JSON string written with ``ensure_ascii=False``. Each line is
decoded as UTF-8 on its own, so a line that is not UTF-8 is a problem of that line, named by its number.

A JSON document (LLaVA's files are one JSON list) is decoded with ``surrogateescape``: a byte that is not
UTF-8 inside a string becomes a lone surrogate and marks only the record that holds it. The list is read
element by element, so every record knows where it starts; a document that still does not parse is a
``JsonFileError`` naming the file, line, column and byte offset.

A string holding a lone surrogate (an undecodable byte, or a ``\\udc80`` escape in the JSON) is not text:
Arrow and Parquet refuse it, so ``text_problem`` reports it and the record is skipped, not written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark some editors put first
_SURROGATE = re.compile("[\ud800-\udfff]")
_WHITESPACE = " \t\n\r"  # JSON's insignificant whitespace


class JsonFileError(ValueError):
    """A JSON / JSON Lines file that cannot be read at all; names the file and, where known, the byte offset."""

    def __init__(self, path: str | Path, reason: str, offset: int | None = None) -> None:
        where = str(path) if offset is None else f"{path}, byte offset {offset}"
        super().__init__(f"{where}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.offset = offset

    def __reduce__(self):  # rebuilt from its fields when it crosses Ray
        return type(self), (self.path, self.reason, self.offset)


@dataclass(frozen=True)
class JsonRecord:
    """One record of a file: where it is, its value (None when it has a problem) and the problem, if any.

    ``index`` counts records (non-blank lines of a JSON Lines file, elements of a JSON list) from 0; ``line`` is
    the 1-based line of a JSON Lines record, ``offset`` the byte offset of a JSON list element with a problem.
    """

    index: int
    value: Any
    problem: str | None = None
    line: int | None = None
    offset: int | None = None

    def where(self) -> dict[str, int]:
        """The location keys of a skip record: index, and line or byte offset when known."""
        out = {"index": self.index}
        if self.line is not None:
            out["line"] = self.line
        if self.offset is not None:
            out["offset"] = self.offset
        return out


def text_problem(value: Any, escaped_bytes: bool = False) -> str | None:
    """Why ``value`` (a parsed JSON value) holds something that is not Unicode text, or None when it does not.

    ``escaped_bytes``: the text was decoded with ``surrogateescape``, so U+DC80..U+DCFF are bytes that are not UTF-8.
    """
    if isinstance(value, str):
        found = _SURROGATE.search(value)
        if found is None:
            return None
        char = ord(found.group())
        if escaped_bytes and 0xDC80 <= char <= 0xDCFF:
            return f"not UTF-8: byte 0x{char - 0xDC00:02x} after {value[: found.start()][-40:]!r}"
        return f"a string holds a lone surrogate \\u{char:04x}, which is not Unicode text"
    if isinstance(value, dict):
        return next((p for item in value.items() for v in item if (p := text_problem(v, escaped_bytes))), None)
    if isinstance(value, list):
        return next((p for v in value if (p := text_problem(v, escaped_bytes))), None)
    return None


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes without a leading UTF-8 BOM; JsonFileError when it is missing or unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise JsonFileError(path, "no such file") from None
    except IsADirectoryError:
        raise JsonFileError(path, "a directory, not a file") from None
    except OSError as err:
        raise JsonFileError(path, f"cannot be read: {err.strerror or err}") from None
    return data[len(BOM) :] if data.startswith(BOM) else data


def read_json_lines(path: str | Path) -> list[JsonRecord]:
    """Every non-blank line of a JSON Lines file as a record, each decoded and parsed on its own."""
    records: list[JsonRecord] = []
    for number, raw in enumerate(read_bytes(path).split(b"\n"), start=1):
        if not raw.strip():
            continue
        index = len(records)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            problem = f"line {number} is not UTF-8: byte 0x{raw[err.start]:02x} at column {err.start + 1}"
            records.append(JsonRecord(index, None, problem, line=number))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            problem = f"line {number} is not JSON: {err.msg} at column {err.colno}"
            records.append(JsonRecord(index, None, problem, line=number))
            continue
        problem = text_problem(value) if "\\u" in text else None  # only an escape can make a lone surrogate here
        if problem:
            records.append(JsonRecord(index, None, f"line {number}: {problem}", line=number))
        else:
            records.append(JsonRecord(index, value, line=number))
    return records


def _byte_offset(text: str, position: int) -> int:
    return len(text[:position].encode("utf-8", "surrogateescape"))


def _error_at(path: str | Path, text: str, position: int, reason: str) -> JsonFileError:
    line = text.count("\n", 0, position) + 1
    column = position - (text.rfind("\n", 0, position) + 1) + 1
    return JsonFileError(path, f"{reason} (line {line}, column {column})", _byte_offset(text, position))


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in _WHITESPACE:
        position += 1
    return position


def read_json_list(path: str | Path) -> list[JsonRecord]:
    """Every element of a file holding one JSON list, as a record; JsonFileError when the file is not a JSON list.

    An element holding bytes that are not UTF-8 (or a lone surrogate) is a record with a problem naming its byte
    offset; the other elements are untouched.
    """
    data = read_bytes(path)
    text = data.decode("utf-8", "surrogateescape")
    decoder = json.JSONDecoder()
    position = _skip_whitespace(text, 0)
    if position == len(text):
        raise JsonFileError(path, "not JSON: the file is empty")
    if text[position] != "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise _error_at(path, text, err.pos, f"not JSON: {err.msg}") from None
        raise JsonFileError(path, f"expected a JSON list of records, got {type(value).__name__}")
    may_have_surrogates = _SURROGATE.search(text) is not None or "\\u" in text
    records: list[JsonRecord] = []
    position = _skip_whitespace(text, position + 1)
    if position < len(text) and text[position] == "]":
        return _after_list(path, text, position + 1, records)
    while True:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            raise _error_at(path, text, err.pos, f"not JSON: {err.msg}") from None
        problem = text_problem(value, escaped_bytes=True) if may_have_surrogates else None
        if problem:
            records.append(JsonRecord(len(records), None, problem, offset=_byte_offset(text, position)))
        else:
            records.append(JsonRecord(len(records), value))
        position = _skip_whitespace(text, end)
        if position < len(text) and text[position] == ",":
            position = _skip_whitespace(text, position + 1)
            continue
        if position < len(text) and text[position] == "]":
            return _after_list(path, text, position + 1, records)
        reason = "not JSON: the list is cut off" if position >= len(text) else "not JSON: expected ',' or ']'"
        raise _error_at(path, text, min(position, len(text)), reason)


def _after_list(path: str | Path, text: str, position: int, records: list[JsonRecord]) -> list[JsonRecord]:
    position = _skip_whitespace(text, position)
    if position != len(text):
        raise _error_at(path, text, position, "not JSON: extra data after the list")
    return records


def read_json_records(path: str | Path) -> list[JsonRecord]:
    """A ``.jsonl`` file line by line, anything else as one JSON list (``read_json_lines`` / ``read_json_list``)."""
    return read_json_lines(path) if Path(path).suffix.lower() == ".jsonl" else read_json_list(path)
