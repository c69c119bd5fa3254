"""Integration tests for mmdc/train/launcher.py and worker.py: real Ray Train runs (2 CPU workers) on a tiny LLaVA.

Each test trains a few optimizer steps on a tiny repeated batch and checks what a user relies on:
the loss falls, the checkpoint reloads with ``from_pretrained`` (model and processor) and
generates, stage 1 changes only the projector, LoRA merges (ZeRO-2 and ZeRO-3), ZeRO-3 consolidates
before saving, and an interrupted run resumes from its saved state to the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mmdc.config import LoraConfig, TrainConfig
from mmdc.train.launcher import train_student
from mmdc.world.tiny import TinySpec, build_tiny_llava, train_tokenizer

pytestmark = pytest.mark.integration

SPEC = TinySpec(
    image_size=32,
    patch_size=16,
    vision_hidden=32,
    vision_layers=2,
    vision_heads=2,
    text_hidden=64,
    text_layers=2,
    text_heads=2,
    text_intermediate=128,
    vocab_size=400,
    max_position_embeddings=256,
)
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """Images, conversation rows, caption rows and a tiny student checkpoint, built once per module."""
    root = tmp_path_factory.mktemp("train_loop")
    conversations, captions = [], []
    for i, (name, rgb) in enumerate(COLORS.items()):
        img = Image.new("RGB", (32, 32), (255, 255, 255))
        ImageDraw.Draw(img).rectangle([6, 6, 26, 26], fill=rgb)
        img.save(root / f"img{i}.png")
        conversations.append(
            {
                "conversation_id": f"img{i}",
                "image_id": f"img{i}",
                "image": f"img{i}.png",
                "questions": ["what color is the square?", "is there a square?"],
                "answers": [f"the square is {name}.", "yes."],
                "instruction_ids": [f"q{i}a", f"q{i}b"],
            }
        )
        captions.append({"id": f"img{i}", "image": f"img{i}.png", "caption": f"a {name} square."})
    texts = [q for c in conversations for q in c["questions"]] + [a for c in conversations for a in c["answers"]]
    texts += [c["caption"] for c in captions]
    tokenizer = train_tokenizer(texts, vocab_size=SPEC.vocab_size)
    ckpt = build_tiny_llava(root / "student0", SPEC, tokenizer, seed=0)
    return {"root": root, "conversations": conversations, "captions": captions, "ckpt": ckpt}


def _cfg(**kw) -> TrainConfig:
    base = dict(
        strategy="deepspeed",
        zero_stage=2,
        num_workers=2,
        cpus_per_worker=0.5,
        lr=3e-3,
        warmup_ratio=0.0,
        lr_schedule="constant",
        global_batch_size=4,
        micro_batch_size=2,
        epochs=6,
        max_length=128,
    )
    base.update(kw)
    return TrainConfig(**base)


def _state(path: str) -> dict[str, torch.Tensor]:
    from transformers import LlavaForConditionalGeneration

    return {k: v.clone() for k, v in LlavaForConditionalGeneration.from_pretrained(path).state_dict().items()}


def _generates(path: str, image: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the square?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


# 8 rows -> 4 per worker; micro 1 x accum 2 -> 2 optimizer steps per epoch, 12 in all; cosine after a
# 10% warmup, so a resumed run must restore the schedule and the accumulation boundary as well.
ZERO2 = dict(micro_batch_size=1, lr_schedule="cosine", warmup_ratio=0.1)


def _train_zero2(world: dict, out: Path, run_name: str, **kw):
    import ray

    return train_student(
        stage="tune",
        init_checkpoint=world["ckpt"],
        output_dir=str(out / "ckpt"),
        dataset=ray.data.from_items(world["conversations"] * 2),
        train_cfg=_cfg(**ZERO2, checkpoint_every_steps=5),
        seed=0,
        image_root=str(world["root"]),
        metrics_path=str(out / "metrics.jsonl"),
        run_name=run_name,
        **kw,
    )


def _stop_after_step_7(step: int) -> None:
    """``on_step`` fault injection: every worker raises right after optimizer step 7 (and its state save)."""
    if step == 7:
        raise RuntimeError("stopping after step 7 (fault injection)")


def _steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def zero2_run(ray_cluster, tiny_world, tmp_path_factory):
    """One uninterrupted ZeRO-2 tune: checked on its own and the reference for the resumed run."""
    out = tmp_path_factory.mktemp("zero2")
    return out, _train_zero2(tiny_world, out, "tune-z2")


def test_tune_deepspeed_zero2_loss_falls_and_checkpoint_reloads(tiny_world, zero2_run):
    out, result = zero2_run
    m = result.metrics
    assert m["steps"] == 12 and m["samples"] == 48 and m["dropped_samples"] == 0
    assert m["final_loss"] < 0.7 * m["first_loss"]
    lines = _steps(out)[-12:]  # last attempt
    assert [r["step"] for r in lines] == list(range(1, 13))
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in lines)
    assert lines[-1]["loss"] == pytest.approx(m["final_loss"])
    assert (Path(result.checkpoint_dir) / "model.safetensors").exists()
    _generates(result.checkpoint_dir, tiny_world["root"] / "img0.png")
    before, after = _state(tiny_world["ckpt"]), _state(result.checkpoint_dir)
    vision = [k for k in before if "vision_tower" in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # tower frozen in stage 2
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])  # LM trains


def test_interrupted_training_resumes_from_its_last_state(tiny_world, zero2_run, tmp_path):
    """Stop after step 7 (state saved at step 5), call again: steps 6-12 retrained, result as if never stopped."""
    from ray import cloudpickle  # Ray's own copy: registering with the standalone package would not reach Ray

    from mmdc.train.checkpoints import read_train_state, train_state_dir

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    ref_out, reference = zero2_run
    with pytest.raises(Exception):  # noqa: B017 - Ray Train wraps the workers' error in its own type
        _train_zero2(tiny_world, tmp_path, "tune-z2-stopped", max_failures=0, on_step=_stop_after_step_7)
    marker = read_train_state(tmp_path / "ckpt")
    assert (marker["step"], marker["epoch"], marker["micro_in_epoch"]) == (5, 2, 2)  # mid-epoch: 2 batches to skip
    assert not (tmp_path / "ckpt").exists()  # no final checkpoint yet

    resumed = _train_zero2(tiny_world, tmp_path, "tune-z2-resumed")
    assert resumed.metrics["resumed_from_step"] == 5 and resumed.metrics["steps"] == 12
    assert [r["step"] for r in _steps(tmp_path)] == list(range(1, 8)) + list(range(6, 13))  # 6, 7 trained twice
    for got, want in zip(_steps(tmp_path)[-7:], _steps(ref_out)[-7:]):
        assert got["step"] == want["step"]
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-6)  # schedule restored
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)  # same batches, weights and Adam state
    for key in ("samples", "tokens", "micro_steps_per_worker", "first_loss"):
        assert resumed.metrics[key] == reference.metrics[key], key
    before, after = _state(reference.checkpoint_dir), _state(resumed.checkpoint_dir)
    assert max(float((before[k] - after[k]).abs().max()) for k in before) < 1e-5  # float order only
    assert not train_state_dir(tmp_path / "ckpt").exists()  # removed once the final checkpoint is written


def test_align_ddp_changes_only_the_projector(ray_cluster, tiny_world, tmp_path):
    import ray

    result = train_student(
        stage="align",
        init_checkpoint=tiny_world["ckpt"],
        output_dir=str(tmp_path / "align"),
        dataset=ray.data.from_items(tiny_world["captions"]),
        train_cfg=_cfg(strategy="ddp", epochs=2),
        seed=0,
        image_root=str(tiny_world["root"]),
        run_name="align-ddp",
    )
    assert result.metrics["steps"] == 2
    before, after = _state(tiny_world["ckpt"]), _state(result.checkpoint_dir)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    projector = {k for k in before if "multi_modal_projector" in k}
    assert changed and changed <= projector
    assert any("weight" in k for k in changed)


@pytest.mark.parametrize("zero_stage", [2, 3])  # ZeRO-3: consolidated onto rank 0, merged there (issue 25)
def test_lora_merged_checkpoint_reloads(ray_cluster, tiny_world, tmp_path, zero_stage):
    import ray

    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], merge=True)
    result = train_student(
        stage="tune",
        init_checkpoint=tiny_world["ckpt"],
        output_dir=str(tmp_path / "lora"),
        dataset=ray.data.from_items(tiny_world["conversations"]),
        train_cfg=_cfg(epochs=2, lora=lora, zero_stage=zero_stage),
        seed=1,
        image_root=str(tiny_world["root"]),
        run_name="lora",
    )
    before, after = _state(tiny_world["ckpt"]), _state(result.checkpoint_dir)
    assert before.keys() == after.keys()  # merged: no lora_A / lora_B / modules_to_save keys left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lm_q = {k for k in before if "language_model" in k and ("q_proj" in k or "v_proj" in k)}
    assert lm_q & changed  # LoRA deltas folded into the LM's q/v projections
    assert not {k for k in changed if "vision_tower" in k or "k_proj" in k or "mlp" in k or "lm_head" in k}
    assert {k for k in changed if "multi_modal_projector" in k}  # the projector trains fully in stage 2
    _generates(result.checkpoint_dir, tiny_world["root"] / "img1.png")


def test_zero3_saves_a_full_checkpoint_and_counts_dropped_rows(ray_cluster, tiny_world, tmp_path):
    import ray

    # 4 rows whose first answer lies beyond max_length: dropped, counted, and (where a whole micro
    # batch is lost) replaced by a zero-weight placeholder so the workers' collectives stay matched
    long_row = dict(tiny_world["conversations"][0], questions=["what color is the square? " * 40, "is it?"])
    rows = [dict(long_row, conversation_id=f"too-long-{i}") for i in range(4)] + tiny_world["conversations"]
    result = train_student(
        stage="tune",
        init_checkpoint=tiny_world["ckpt"],
        output_dir=str(tmp_path / "z3"),
        dataset=ray.data.from_items(rows),
        train_cfg=_cfg(zero_stage=3, epochs=1),
        seed=0,
        image_root=str(tiny_world["root"]),
        run_name="zero3",
    )
    assert result.metrics["dropped_samples"] == 4
    assert result.metrics["samples"] == 4
    assert result.metrics["steps"] == 2 and result.metrics["micro_steps_per_worker"] == 2
    before, after = _state(tiny_world["ckpt"]), _state(result.checkpoint_dir)
    assert all(after[k].shape == before[k].shape for k in before)  # gathered, not ZeRO-3 partitions
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(result.checkpoint_dir).tokenizer.image_token == "<image>"


def test_refuses_a_non_empty_output_dir_and_too_little_data(ray_cluster, tiny_world, tmp_path):
    import ray

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    ds = ray.data.from_items(tiny_world["conversations"])
    with pytest.raises(ValueError, match="not empty"):
        train_student(
            stage="tune",
            init_checkpoint=tiny_world["ckpt"],
            output_dir=str(tmp_path / "full"),
            dataset=ds,
            train_cfg=_cfg(),
            seed=0,
        )
    with pytest.raises(ValueError, match="global batch"):
        train_student(
            stage="tune",
            init_checkpoint=tiny_world["ckpt"],
            output_dir=str(tmp_path / "x"),
            dataset=ds,
            train_cfg=_cfg(global_batch_size=8, epochs=1),
            seed=0,
        )
