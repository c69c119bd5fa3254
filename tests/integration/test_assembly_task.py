"""The assembled student is built by a Ray task sized for it (mmdc/actors/assembly.py), not in the caller's process.

Issue 25, defect a: ``models.student_init: assemble`` used to run inside the Driver actor, in fp32. Here the
driver's assembler runs on the session's local Ray cluster: another process, the configured dtype, a memory
request from mmdc.sizing, and a checkpoint ``from_pretrained`` loads.
"""

from __future__ import annotations

import os

import pytest
import torch

from mmdc.actors.assembly import assembly_memory, remote_assembler
from mmdc.config import ModelsConfig
from mmdc.world import models

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from mmdc.world.tiny import train_tokenizer

    root = tmp_path_factory.mktemp("parts")
    tokenizer = train_tokenizer(["what color is the square?", "the square is red."], vocab_size=300)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=256,
        )
    )
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32)
    CLIPVisionModel(CLIPVisionConfig(**vision, patch_size=16)).save_pretrained(root / "vision")
    return root


def test_the_driver_assembles_in_a_ray_task_in_the_training_dtype(ray_cluster, parts, tmp_path):
    from transformers import LlavaForConditionalGeneration

    cfg = ModelsConfig(student_init="assemble", vision_tower=str(parts / "vision"), language_model=str(parts / "lm"))
    said: list[str] = []
    path = models.resolve(
        "assemble",
        cfg,
        assemble_into=tmp_path / "init",
        assemble_dtype="float16",
        assembler=remote_assembler(cfg, said.append),
    )
    need = assembly_memory(cfg, "float16")
    assert need and any(f"asks for {need / 1024**3:.1f} GiB of memory" in line for line in said)
    done = next(line for line in said if line.startswith("assembled the student"))
    assert "(pid " in done and f"(pid {os.getpid()})" not in done  # not in this (the driver's) process
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype="auto")
    assert model.dtype == torch.float16
