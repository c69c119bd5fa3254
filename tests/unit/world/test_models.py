"""``models.resolve`` for an assembled student: the dtype it is built in and where the building happens."""

from __future__ import annotations

import pytest

from mmdc.config import ModelsConfig, assemble_dtype, config_from_dict
from mmdc.world.models import resolve


class FakeAssembler:
    """Records how it was asked; writes a marker where it was told to (the real one writes a checkpoint)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[dict] = []
        self.fail = fail

    def __call__(self, vision_tower, language_model, out_dir, *, projector, dtype):
        from pathlib import Path

        self.calls.append(dict(vision=vision_tower, lm=language_model, out=out_dir, projector=projector, dtype=dtype))
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        if self.fail:
            raise RuntimeError("killed half-way")
        return out_dir


def test_assemble_runs_through_the_given_assembler_in_the_given_dtype_once(tmp_path):
    models = ModelsConfig(student_init="assemble", vision_tower="v", language_model="lm")
    assembler = FakeAssembler()
    into = tmp_path / "init"
    path = resolve("assemble", models, assemble_into=into, assemble_dtype="float16", assembler=assembler)
    assert path == str(into) and (into / "config.json").exists()
    (call,) = assembler.calls
    assert call["dtype"] == "float16" and call["out"] != str(into)  # written beside it, then renamed
    resolve("assemble", models, assemble_into=into, assemble_dtype="float16", assembler=assembler)
    assert len(assembler.calls) == 1  # kept when it exists


def test_a_crashed_assembly_leaves_no_student_behind(tmp_path):
    models = ModelsConfig(student_init="assemble")
    into = tmp_path / "init"
    with pytest.raises(RuntimeError):
        resolve("assemble", models, assemble_into=into, assembler=FakeAssembler(fail=True))
    assert not into.exists()  # a resumed run assembles again instead of loading half a checkpoint
    resolve("assemble", models, assemble_into=into, assembler=FakeAssembler())
    assert into.exists() and not (tmp_path / "init.partial").exists()


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({}, "float32"),  # the CPU default trains in fp32
        ({"align": {"precision": "fp16"}}, "float16"),
        ({"align": {"enabled": False}, "tune": {"precision": "bf16"}}, "bfloat16"),  # the first stage that loads it
        ({"align": {"precision": "fp16"}, "models": {"assemble_dtype": "float32"}}, "float32"),
    ],
)
def test_assemble_dtype_follows_the_first_training_stage(sections, expected):
    assert assemble_dtype(config_from_dict(sections)) == expected
