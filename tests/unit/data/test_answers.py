"""The teacher's answer store: the key of an answer, and a store that asks for each answer once."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from mmdc import roles
from mmdc.data.answers import AnswerStore, answer_key, model_fingerprint
from mmdc.roles import messages_without_images, teacher_messages


def test_answer_key():
    messages = messages_without_images(teacher_messages("What is it?", "data:image/png;base64,AAAA"))
    key = answer_key("llava-13b@abc", messages, "AB" * 32, {"temperature": 0.5, "max_tokens": 256}, 0)
    assert len(key) == 64 and int(key, 16) >= 0
    # Dict order and int-vs-float spelling do not change the key.
    same = answer_key("llava-13b@abc", messages, "ab" * 32, {"max_tokens": 256.0, "temperature": 0.5}, 0)
    assert same == key
    for changed in (
        answer_key("llava-13b@def", messages, "ab" * 32, {"temperature": 0.5, "max_tokens": 256}, 0),
        answer_key("llava-13b@abc", messages, "cd" * 32, {"temperature": 0.5, "max_tokens": 256}, 0),
        answer_key("llava-13b@abc", messages, "ab" * 32, {"temperature": 0.7, "max_tokens": 256}, 0),
        answer_key("llava-13b@abc", messages, "ab" * 32, {"temperature": 0.5, "max_tokens": 256}, 1),
        answer_key(
            "llava-13b@abc",
            messages_without_images(teacher_messages("What is that?", "x")),
            "ab" * 32,
            {"temperature": 0.5, "max_tokens": 256},
            0,
        ),
    ):
        assert changed != key


def test_answer_key_ignores_image_urls_and_refuses_nan():
    sampling = {"temperature": 0.5}
    plain = answer_key("m", messages_without_images(teacher_messages("q", "x")), "ab", sampling, 0)
    assert answer_key("m", teacher_messages("q", "data:image/png;base64,AAAA"), "ab", sampling, 0) == plain
    assert answer_key("m", teacher_messages("q", "/some/other/path.jpg"), "ab", sampling, 0) == plain
    with pytest.raises(ValueError, match="not finite"):
        answer_key("m", [], "ab", {"temperature": float("nan")}, 0)


def test_store_keys_rows_by_content_and_keeps_what_it_was_given(tmp_path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red.png")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red_copy.png")  # same pixels, same bytes
    store = AnswerStore(
        tmp_path / "answers", "fp", {"temperature": 0.5, "max_new_tokens": 8, "retries": 3}, 0, str(tmp_path)
    )
    rows = pd.DataFrame(
        {
            "instruction_id": ["a", "a", "b"],
            "image": ["red.png", "red_copy.png", "red.png"],
            "question": ["what colour?"] * 3,
        }
    )
    keyed = store.with_keys(rows)
    assert keyed["cache_key"][0] == keyed["cache_key"][1]  # same picture under another name: same answer
    assert keyed["cache_key"][0] != keyed["cache_key"][2]  # another instruction: its own seed
    expected = answer_key(
        "fp",
        teacher_messages("what colour?", "<image>"),
        store.image_sha("red.png"),
        {"temperature": 0.5, "max_new_tokens": 8},
        roles.row_seed(0, "teacher", "a"),
    )
    assert keyed["cache_key"][0] == expected  # retries never enter the key
    assert store.load().empty
    answered = keyed.assign(teacher_answer=["red", "red", "a red circle"], teacher_tokens=[1, 1, 3])
    store.add(answered, "iter_1_teach")
    loaded = store.load()
    assert loaded.loc[keyed["cache_key"][2], "teacher_answer"] == "a red circle" and len(loaded) == 2


def test_model_fingerprint_follows_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a" * 10)
    before = model_fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"b" * 10)
    assert model_fingerprint(str(tmp_path)) != before
    assert model_fingerprint("org/some-hub-id") == model_fingerprint("org/some-hub-id")


def test_answer_asks_only_for_what_was_never_stored(tmp_path):
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "blue.png")
    store = AnswerStore(tmp_path / "answers", "fp", {"temperature": 0.5}, 0, str(tmp_path))
    rows = pd.DataFrame({"instruction_id": ["a", "b"], "image": ["blue.png"] * 2, "question": ["colour?", "shape?"]})
    asked: list[list[str]] = []

    def ask(misses: pd.DataFrame) -> pd.DataFrame:
        asked.append(misses["instruction_id"].tolist())
        return misses.assign(teacher_answer=[f"answer {i}" for i in misses["instruction_id"]], teacher_tokens=2)

    first, stats = store.answer(rows.iloc[:1], ask, "iter_1_teach")
    assert stats == {"cache_hits": 0, "cache_misses": 1, "generated_tokens": 2}
    both, stats = store.answer(rows, ask, "iter_1_assess")
    assert asked == [["a"], ["b"]] and stats["cache_hits"] == 1 and stats["cache_misses"] == 1
    assert both["teacher_answer"].tolist() == ["answer a", "answer b"]
    assert sorted(p.name for p in (tmp_path / "answers").iterdir()) == ["iter_1_assess.parquet", "iter_1_teach.parquet"]


def test_a_runs_store_keys_by_its_teacher_role_and_seed(tmp_path):
    from mmdc.config import Config

    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text("{}")
    cfg = Config()
    cfg.run.seed, cfg.roles.teacher.temperature = 3, 0.7
    store = AnswerStore.of_run(tmp_path / "answers", str(tmp_path / "teacher"), cfg, str(tmp_path))
    assert store.model_fingerprint == model_fingerprint(str(tmp_path / "teacher"))
    assert store.run_seed == 3 and store.sampling == {"temperature": 0.7, "max_new_tokens": 512}
