"""JSON and JSON Lines read as bytes: one bad byte or line costs its record, never the file; errors say where."""

from __future__ import annotations

import json

import pytest

from mmdc.data.jsonfiles import JsonFileError, read_json_lines, read_json_list, read_json_records, text_problem


def test_json_lines_split_on_newline_only_so_a_line_separator_inside_a_string_stays(tmp_path):
    good = {"id": "a", "text": "one\u2028two\u2029three\x85four\x1cfive"}  # str.splitlines breaks on each of these
    path = tmp_path / "x.jsonl"
    path.write_bytes((json.dumps(good, ensure_ascii=False) + "\n" + json.dumps({"id": "b"}) + "\n").encode("utf-8"))
    records = read_json_lines(path)
    assert [r.value for r in records] == [good, {"id": "b"}] and [r.line for r in records] == [1, 2]


def test_a_line_that_is_not_utf8_is_a_problem_naming_its_line_and_the_others_stay(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"id": "a"}\r\n\n{"id": "caf\xe9"}\n{"id": "c"}\n{broken\n')
    records = read_json_lines(path)
    assert [(r.index, r.line) for r in records] == [(0, 1), (1, 3), (2, 4), (3, 5)]
    assert records[0].value == {"id": "a"} and records[2].value == {"id": "c"}
    assert records[1].value is None and records[1].problem.startswith("line 3 is not UTF-8: byte 0xe9")
    assert records[3].problem.startswith("line 5 is not JSON")
    assert records[1].where() == {"index": 1, "line": 3}


def test_a_lone_surrogate_escape_is_not_text(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"q": "fine \\ud83d\\ude00"}\n{"q": "bad \\udc80"}\n')
    first, second = read_json_lines(path)
    assert first.value == {"q": "fine \U0001f600"} and first.problem is None
    assert "lone surrogate" in second.problem and second.value is None


def test_a_bom_is_ignored(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"id": 1}\n')
    (tmp_path / "a.json").write_bytes(b'\xef\xbb\xbf[{"id": 1}]')
    assert read_json_records(tmp_path / "a.jsonl")[0].value == read_json_records(tmp_path / "a.json")[0].value


def test_a_json_list_with_a_bad_byte_loses_only_that_record_and_says_where(tmp_path):
    head = '[{"id": "é"},\n '.encode()
    raw = head + b'{"id": "b\xff"}, {"id": "c", "t": "x\xe2\x80\xa8y"}]\n'
    path = tmp_path / "x.json"
    path.write_bytes(raw)
    records = read_json_list(path)
    assert [r.value for r in records] == [{"id": "é"}, None, {"id": "c", "t": "x\u2028y"}]
    assert records[1].offset == len(head) and "not UTF-8: byte 0xff" in records[1].problem
    assert records[1].where() == {"index": 1, "offset": len(head)}


@pytest.mark.parametrize(
    "raw, reason, offset",
    [
        ('[{"id": "é"}, {"id": }]'.encode(), "not JSON: Expecting value (line 1, column 22)", 22),
        (b'[{"id": 1}, {"id": 2}', "not JSON: the list is cut off", 21),
        (b'[{"id": 1}]\n{"id": 2}', "not JSON: extra data after the list (line 2, column 1)", 12),
        (b'[{"id": 1} {"id": 2}]', "not JSON: expected ',' or ']'", 11),
        (b"{not json", "not JSON", 1),
    ],
)
def test_a_json_document_that_does_not_parse_names_the_file_and_byte_offset(tmp_path, raw, reason, offset):
    path = tmp_path / "x.json"
    path.write_bytes(raw)
    with pytest.raises(JsonFileError) as err:
        read_json_list(path)
    assert err.value.offset == offset and reason in err.value.reason
    assert f"{path}, byte offset {offset}: " in str(err.value)


def test_whole_file_problems(tmp_path):
    with pytest.raises(JsonFileError, match="no such file"):
        read_json_list(tmp_path / "absent.json")
    with pytest.raises(JsonFileError, match="a directory"):
        read_json_lines(tmp_path)
    (tmp_path / "empty.json").write_text(" \n")
    with pytest.raises(JsonFileError, match="empty"):
        read_json_list(tmp_path / "empty.json")
    (tmp_path / "dict.json").write_text('{"id": 1}')
    with pytest.raises(JsonFileError, match="expected a JSON list of records, got dict"):
        read_json_list(tmp_path / "dict.json")
    (tmp_path / "none.json").write_text("[]")
    assert read_json_list(tmp_path / "none.json") == []


def test_text_problem_walks_keys_and_values():
    assert text_problem({"a": ["x", {"b": "y"}], "n": 3}) is None
    assert "byte 0xff" in text_problem({"a": ["x", {"b": "y\udcff"}]}, escaped_bytes=True)
    assert "lone surrogate" in text_problem({"a": ["x", {"b": "y\udcff"}]})
    assert "lone surrogate" in text_problem({"k\ud800": 1}, escaped_bytes=True)
