"""LLaVA-Instruct loading and unfolding into the seed pool D_sin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdc.data.llava import (
    LlavaFormatError,
    image_position,
    load_llava_records,
    unfold_single_turn,
)
from mmdc.data.schema import POOL_SCHEMA

ASSET = Path(__file__).parents[2] / "assets" / "llava_instruct_small.json"


def record(rid: str = "r1", questions=("<image>\nWhat is this?", "And that?"), image: str = "r1.jpg") -> dict:
    turns = []
    for q in questions:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": "An answer."}]
    return {"id": rid, "image": image, "conversations": turns}


def write(tmp_path: Path, data, name="data.json") -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
    else:
        path.write_text(json.dumps(data))
    return path


def test_loads_the_llava_asset_and_unfolds_every_human_turn():
    records = load_llava_records(ASSET).records
    assert [r["id"] for r in records] == ["000000033471", "000000052846", "000000334872"]
    table, skips = unfold_single_turn(records, image_root="/data/coco")
    assert skips == [] and table.schema == POOL_SCHEMA
    rows = table.to_pylist()
    assert len(rows) == 6  # 3 + 2 + 1 human turns
    first = rows[0]
    assert first == {
        "instruction_id": "2ec57ee5a0e430d4",  # printf '000000033471:0' | sha1sum
        "image_id": "000000033471",
        "image": "/data/coco/000000033471.jpg",
        "question": "What are the colors of the bus in the image?",
        "origin": "seed",
        "parent_id": None,
        "iteration": 0,
        "turn": 0,
        "image_position": "before",
        "source_id": "000000033471",
    }
    assert [r["turn"] for r in rows] == [0, 1, 2, 0, 1, 0]
    assert [r["image_position"] for r in rows] == ["before", "none", "none", "after", "none", "before"]
    assert rows[3]["question"] == "Where is the cat positioned in the image?"
    assert len({r["instruction_id"] for r in rows}) == 6
    assert all("<image>" not in r["question"] for r in rows)


def test_jsonl_gives_the_same_records(tmp_path):
    records = json.loads(ASSET.read_text())
    assert load_llava_records(write(tmp_path, records, "data.jsonl")).records == records


def test_image_position():
    assert image_position("<image>\nQ?") == "before"
    assert image_position("  <image> Q?") == "before"
    assert image_position("Q?\n<image>") == "after"


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "not JSON"),
        ('{"id": "x"}', "expected a JSON list of records, got dict"),
    ],
)
def test_file_that_is_not_llava_raises_with_path(tmp_path, content, reason):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(LlavaFormatError) as err:
        load_llava_records(path, strict=False)
    assert err.value.path == str(path) and err.value.index is None
    assert str(path) in str(err.value) and reason in str(err.value)


def test_missing_file_and_all_wrong_keys(tmp_path):
    with pytest.raises(LlavaFormatError, match="no such file"):
        load_llava_records(tmp_path / "absent.json")
    path = write(tmp_path, [{"question": "q", "answer": "a"}] * 2)
    with pytest.raises(LlavaFormatError) as err:
        load_llava_records(path, strict=False)  # even lenient: no record at all is LLaVA
    assert err.value.index == 0 and "missing key(s)" in err.value.reason


BAD_RECORDS = [
    ({"id": "x", "image": "x.jpg"}, "missing key(s) ['conversations']"),
    ({**record(), "image": ""}, "'image' must be a non-empty string"),
    ({**record(), "id": None}, "'id' must be a non-empty string or integer"),
    ({**record(), "conversations": []}, "'conversations' must be a non-empty list"),
    ({**record(), "conversations": record()["conversations"][:3]}, "human/gpt turns must come in pairs"),
    (
        {**record(), "conversations": [{"from": "gpt", "value": "<image>"}, {"from": "human", "value": "a"}]},
        "conversations[0] is from 'gpt', expected 'human'",
    ),
    (
        {**record(), "conversations": [{"from": "human", "value": "<image> q"}, {"value": "a"}]},
        "conversations[1] must be an object with 'from' and 'value'",
    ),
    (record(questions=("What is this?",)), "the first human turn has no <image> placeholder"),
    ("just a string", "expected an object, got str"),
]


@pytest.mark.parametrize("bad, reason", BAD_RECORDS)
def test_strict_raises_with_file_and_index(tmp_path, bad, reason):
    path = write(tmp_path, [record("a", image="a.jpg"), bad])
    with pytest.raises(LlavaFormatError) as err:
        load_llava_records(path)
    assert err.value.index == 1 and reason in err.value.reason
    assert f"{path}, record 1:" in str(err.value)


def test_lenient_returns_skips_with_reasons(tmp_path):
    data = [record("a", image="a.jpg")] + [bad for bad, _ in BAD_RECORDS] + [record("b", image="b.jpg")]
    result = load_llava_records(write(tmp_path, data), strict=False)
    assert [r["id"] for r in result.records] == ["a", "b"]
    assert [s["index"] for s in result.skipped] == list(range(1, len(BAD_RECORDS) + 1))
    for skip, (_, reason) in zip(result.skipped, BAD_RECORDS):
        assert reason in skip["reason"]


def test_jsonl_bad_line_is_a_skip_with_its_index(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record("a")) + "\n{broken\n\n" + json.dumps(record("b")) + "\n")
    result = load_llava_records(path, strict=False)
    assert [r["id"] for r in result.records] == ["a", "b"]
    assert result.skipped[0]["index"] == 1 and result.skipped[0]["line"] == 2
    assert "line 2 is not JSON" in result.skipped[0]["reason"]
    with pytest.raises(LlavaFormatError, match=r"data.jsonl, record 1: line 2 is not JSON"):
        load_llava_records(path)


def test_integer_ids_and_nested_image_paths():
    rec = record(rid=12, image="coco/train2017/000000000012.jpg")  # type: ignore[arg-type]
    table, skips = unfold_single_turn([rec], image_root=None)
    rows = table.to_pylist()
    assert skips == []
    assert rows[0]["source_id"] == "12" and rows[0]["image_id"] == "000000000012"
    assert rows[0]["image"] == "coco/train2017/000000000012.jpg"
    table, _ = unfold_single_turn([{**rec, "image": "/abs/x.jpg"}], image_root="/root")
    assert table.column("image").to_pylist()[0] == "/abs/x.jpg"


def test_empty_questions_are_skipped_with_reason():
    rec = record(questions=("<image>\n   ", "Real question?", " "))
    table, skips = unfold_single_turn([rec], image_root=None)
    assert table.column("question").to_pylist() == ["Real question?"]
    assert table.column("turn").to_pylist() == [1]
    assert [(s["turn"], s["reason"]) for s in skips] == [
        (0, "empty question after removing <image>"),
        (2, "empty question after removing <image>"),
    ]


def test_repeated_ids_keep_distinct_sources_and_exact_duplicates_are_skipped():
    conversation = record("img", questions=("<image>\nWhat color is the bus?", "Where is it?"))
    detail = record("img", questions=("Describe the image in detail.\n<image>",))
    table, skips = unfold_single_turn([conversation, detail, conversation], image_root=None)
    rows = table.to_pylist()
    # The detail record reuses the id with a different question: kept, with its own source id and ids.
    assert [(r["source_id"], r["turn"], r["question"]) for r in rows] == [
        ("img", 0, "What color is the bus?"),
        ("img", 1, "Where is it?"),
        ("img#1", 0, "Describe the image in detail."),
    ]
    assert len({r["instruction_id"] for r in rows}) == 3
    assert rows[2]["image_position"] == "after"
    # The third record repeats the first exactly: both turns skipped, naming the original.
    assert [(s["turn"], s["reason"]) for s in skips] == [
        (0, "duplicate of source 'img' turn 0 (same id, turn and question)"),
        (1, "duplicate of source 'img' turn 1 (same id, turn and question)"),
    ]


def test_unfold_is_deterministic_and_reports_invalid_records():
    records = json.loads(ASSET.read_text())
    a, _ = unfold_single_turn(records, "/x")
    b, _ = unfold_single_turn(records, "/x")
    assert a.equals(b)
    table, skips = unfold_single_turn([{"id": "z"}], None)
    assert table.num_rows == 0 and "missing key(s)" in skips[0]["reason"] and skips[0]["id"] == "z"


def test_caption_pairs_plain_and_pretrain_formats(tmp_path):
    import json

    from mmdc.data.llava import LlavaFormatError, load_caption_pairs

    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"id": "a", "image": "a.png", "caption": " A red circle. "}]))
    assert load_caption_pairs(plain).records == [{"id": "a", "image": "a.png", "caption": "A red circle."}]
    pretrain = tmp_path / "pretrain.json"
    pretrain.write_text(
        json.dumps(
            [
                {
                    "id": "b",
                    "image": "b.jpg",
                    "conversations": [
                        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                        {"from": "gpt", "value": "a dog on a beach"},
                    ],
                }
            ]
        )
    )
    assert load_caption_pairs(pretrain).records[0]["caption"] == "a dog on a beach"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "c", "image": "c.png"}]))
    with pytest.raises(LlavaFormatError) as err:
        load_caption_pairs(bad)
    assert "bad.json" in str(err.value) and "0" in str(err.value)


def test_a_non_utf8_byte_costs_one_record_not_the_file(tmp_path):
    good = json.dumps(record("a"), ensure_ascii=False).encode()
    bad = json.dumps(record("b", questions=("<image>\nCAFE?",))).encode().replace(b"CAFE", b"CAF\xc9")
    listed = tmp_path / "list.json"
    listed.write_bytes(b"[" + good + b", " + bad + b", " + json.dumps(record("c")).encode() + b"]")
    result = load_llava_records(listed, strict=False)
    assert [r["id"] for r in result.records] == ["a", "c"]
    assert result.skipped[0]["index"] == 1 and result.skipped[0]["offset"] == len(good) + 3
    assert "not UTF-8: byte 0xc9" in result.skipped[0]["reason"]
    lines = tmp_path / "lines.jsonl"
    lines.write_bytes(good + b"\n" + bad + b"\n" + json.dumps(record("c")).encode() + b"\n")
    result = load_llava_records(lines, strict=False)
    assert [r["id"] for r in result.records] == ["a", "c"]
    assert result.skipped[0] | {"reason": ""} == {"path": str(lines), "index": 1, "line": 2, "id": None, "reason": ""}


def test_a_record_with_a_line_separator_in_a_question_is_kept(tmp_path):
    rec = record("a", questions=("<image>\nWhat is\u2028this?", "And\u2029that?"))
    path = tmp_path / "data.jsonl"
    path.write_bytes((json.dumps(rec, ensure_ascii=False) + "\n").encode())
    assert load_llava_records(path).records == [rec]


def test_caption_pairs_skip_bad_records_and_refuse_a_file_without_any_pair(tmp_path):
    from mmdc.data.llava import load_caption_pairs

    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"image": "a.png", "caption": "x"}, {"id": "b"}, {"id": "c", "image": "c.png"}]))
    result = load_caption_pairs(path)
    assert result.records == [{"id": "0", "image": "a.png", "caption": "x"}]  # no id: its index
    assert [(s["index"], s["id"]) for s in result.skipped] == [(1, "b"), (2, "c")]
    assert "needs a non-empty 'image'" in result.skipped[0]["reason"] and "no caption" in result.skipped[1]["reason"]
    (tmp_path / "cut.json").write_text('[{"image": "a.png", "caption": "x"}, {"ima')
    with pytest.raises(LlavaFormatError, match=r"cut.json: not JSON: .* at byte offset \d+"):
        load_caption_pairs(tmp_path / "cut.json")
