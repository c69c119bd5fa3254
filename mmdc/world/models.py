"""From a ``models.*`` spec to a local checkpoint path: the one place that knows the tiny models exist.

tiny:teacher         the world teacher, trained locally on the synthetic world (full schedule)
tiny:teacher-short   the same, short schedule (tests, CI)
tiny:random-teacher  an untrained teacher (plumbing only: its referee never parses)
tiny:student         the untrained small student; with a tiny:teacher* it sees through the teacher's
                     vision tower, as the paper's student shares the teacher's CLIP
assemble             vision tower + fresh projector + language model (``models.*``), saved once in the run
anything else        a local path or a hub id, used as it is
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from mmdc.config import ConfigError, ModelsConfig
from mmdc.train.assembly import assemble_llava
from mmdc.world.scenes import world_corpus
from mmdc.world.teacher import ensure_world_teacher, student_with_teacher_vision
from mmdc.world.tiny import ensure_tiny_models

TINY_PREFIX = "tiny:"
WORLD_TEACHERS = {"tiny:teacher": "full", "tiny:teacher-short": "short"}
BUILD_DIR_ENV = "MMDC_BUILD_DIR"  # overrides models.build_dir (tests and CI build into the checkout)


def models_dir(build_dir: str = ModelsConfig.build_dir) -> Path:
    """Where locally built models live: ``$MMDC_BUILD_DIR`` or ``build_dir``, then ``models/``."""
    return Path(os.environ.get(BUILD_DIR_ENV) or os.path.expanduser(build_dir)) / "models"


def resolve(
    spec: str,
    models: ModelsConfig,
    *,
    teacher: str | None = None,
    assemble_into: Path | None = None,
    assemble_dtype: str = "float32",
    assembler: Callable[..., str] = assemble_llava,
    log: Callable[[str], None] = print,
) -> str:
    """The local path (or hub id) of ``spec``, building tiny models once and assembling a student once.

    ``teacher``: the resolved teacher path, needed by ``tiny:student`` beside a world teacher.
    ``assemble_into``: the folder an ``assemble`` student is written to (kept when it exists), in
    ``assemble_dtype`` (``mmdc.config.assemble_dtype``) by ``assembler`` (``assemble_llava``'s signature;
    the driver passes one that runs it in a Ray task sized for the model, never in its own process).
    """
    if spec.startswith(TINY_PREFIX):
        return _resolve_tiny(spec, models, teacher, log)
    if spec == "assemble":
        if assemble_into is None:
            raise ValueError("resolve('assemble') needs assemble_into")
        if not assemble_into.exists():  # written beside it and renamed: a crash never leaves half a student
            partial = assemble_into.with_name(assemble_into.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            assembler(
                models.vision_tower,
                models.language_model,
                str(partial),
                projector=models.projector,
                dtype=assemble_dtype,
            )
            os.replace(partial, assemble_into)
        return str(assemble_into)
    return spec


def _resolve_tiny(spec: str, models: ModelsConfig, teacher: str | None, log: Callable[[str], None]) -> str:
    root = models_dir(models.build_dir)
    texts = world_corpus()  # + the Table 6 prompts, added by the tokenizer builder
    if spec in WORLD_TEACHERS:
        schedule = WORLD_TEACHERS[spec]
        log(f"world teacher ({schedule} schedule): building once into {root} if missing …")
        return ensure_world_teacher(
            root, schedule=schedule, tokenizer_texts=texts, log=lambda message: log(f"world teacher: {message}")
        )
    built = ensure_tiny_models(root, texts, seed=0)
    tiny = {"tiny:random-teacher": built["teacher"], "tiny:student": built["student"]}
    if spec not in tiny:
        raise ConfigError(f"unknown tiny model '{spec}' (known: {', '.join([*WORLD_TEACHERS, *tiny])})")
    if spec == "tiny:student" and models.teacher in WORLD_TEACHERS:
        if teacher is None:
            raise ValueError("tiny:student beside a world teacher needs the resolved teacher path")
        return student_with_teacher_vision(built["student"], teacher, root)
    return str(tiny[spec])
