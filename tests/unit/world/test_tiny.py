"""Tiny LLaVA models: tokenizer, build, reload + generate, cache fingerprint, stage freezing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mmdc.train.templates import CHAT_TEMPLATE, DEFAULT_SYSTEM
from mmdc.world.tiny import (
    FINGERPRINT_FILE,
    STUDENT_SPEC,
    SUBDIR,
    TEACHER_SPEC,
    TinySpec,
    build_tiny_llava,
    ensure_tiny_models,
    freeze_for_stage,
    role_prompt_texts,
    tokenizer_corpus,
    train_tokenizer,
)

TEXTS = [f"What is the color of object {i} in the picture? It is red and round." for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=512)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    return ensure_tiny_models(tmp_path_factory.mktemp("tiny"), TEXTS, seed=0)


def _messages(question: str = "What is in the image?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def test_tokenizer_special_tokens_and_bos(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    assert tokenizer.image_token == "<image>" and tokenizer.image_token_id == 4
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    ids = tokenizer("USER: <image>\nHi ASSISTANT: Yes.</s>").input_ids
    assert ids[0] == 1 and ids.count(4) == 1 and ids[-1] == 2  # BOS added; <image> and </s> stay one token
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.padding_side == "left"


def test_tokenizer_is_byte_level_lossless(tokenizer):
    text = "Ünïcode ✓ 中文 tabs\tand\nnewlines   spaces {braces}"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_corpus_always_has_template_and_table6_prompts():
    corpus = tokenizer_corpus(["x"], extra_texts=["extra"])
    assert DEFAULT_SYSTEM in corpus and "x" in corpus and "extra" in corpus
    prompts = role_prompt_texts()
    from mmdc.roles import REFEREE_USER, TEACHER_SYSTEM

    assert TEACHER_SYSTEM in prompts and REFEREE_USER in prompts
    assert all(p in corpus for p in prompts)
    with pytest.raises(TypeError, match="text 1"):
        tokenizer_corpus(["ok", 3])


def test_spec_validation():
    assert TEACHER_SPEC.image_seq_length == 16
    with pytest.raises(ValueError, match="multiple of patch_size"):
        TinySpec(image_size=60)
    with pytest.raises(ValueError, match="vision_layers"):
        TinySpec(vision_layers=1)
    with pytest.raises(ValueError, match="projector"):
        TinySpec(projector="conv")


def test_reload_and_generate_from_chat_template(models):
    for role in ("teacher", "student"):
        model = LlavaForConditionalGeneration.from_pretrained(models[role]).eval()
        processor = AutoProcessor.from_pretrained(models[role])
        assert model.config.image_seq_length == 16
        prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True)
        assert prompt.endswith("What is in the image? ASSISTANT:")
        images = [Image.new("RGB", (80, 50), (200, 10, 10)), Image.new("RGB", (30, 90), (0, 0, 255))]
        batch = processor(
            images=images,
            text=[prompt, prompt.replace("image?", "picture, please?")],
            return_tensors="pt",
            padding=True,
        )
        # the processor expands <image> to exactly the model's image_seq_length
        assert ((batch["input_ids"] == model.config.image_token_id).sum(dim=1) == 16).all()
        assert batch["pixel_values"].shape == (2, 3, 64, 64)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=8, do_sample=True, temperature=0.5)
        new = out[:, batch["input_ids"].shape[1] :]  # [batch, new]
        assert 1 <= new.shape[1] <= 8
        suppressed = set(model.generation_config.suppress_tokens)
        assert suppressed == {0, 1, 3, 4} and not suppressed & set(new.flatten().tolist())


def test_generation_stops_at_stop_token(models):
    model = LlavaForConditionalGeneration.from_pretrained(models["student"]).eval()
    processor = AutoProcessor.from_pretrained(models["student"])
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("</s>") == 2
    with torch.no_grad():  # all-zero logits: <unk>/<s> are suppressed, so greedy picks id 2 (</s>) first
        model.lm_head.weight.zero_()
    prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True)
    batch = processor(images=Image.new("RGB", (64, 64)), text=prompt, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert out[0, batch["input_ids"].shape[1] :].tolist() == [2]


def test_linear_projector_is_one_matrix(models):
    model = LlavaForConditionalGeneration.from_pretrained(models["teacher"])
    projector = model.model.multi_modal_projector
    assert model.config.projector_hidden_act == "linear"
    x = torch.randn(2, 16, TEACHER_SPEC.vision_hidden)  # [batch, patches, vision_hidden]
    torch.testing.assert_close(projector(x), projector.linear_1(x))


def test_mlp2x_gelu_projector(tmp_path, tokenizer):
    spec = TinySpec(
        text_hidden=32,
        text_layers=1,
        text_heads=2,
        text_intermediate=64,
        vision_hidden=16,
        vision_heads=2,
        projector="mlp2x_gelu",
        vocab_size=512,
    )
    model = LlavaForConditionalGeneration.from_pretrained(build_tiny_llava(tmp_path / "m", spec, tokenizer, seed=0))
    assert model.config.projector_hidden_act == "gelu"
    assert not torch.equal(model.model.multi_modal_projector.linear_2.weight, torch.eye(32))


def test_sizes_are_tiny(models):
    teacher = LlavaForConditionalGeneration.from_pretrained(models["teacher"])
    student = LlavaForConditionalGeneration.from_pretrained(models["student"])
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert 1_000_000 < n_teacher < 5_000_000 and n_student < n_teacher / 2
    assert teacher.config.text_config.vocab_size == student.config.text_config.vocab_size


def _weights(path: str) -> dict[str, torch.Tensor]:
    return LlavaForConditionalGeneration.from_pretrained(path).state_dict()


def test_ensure_reuses_and_rebuilds(tmp_path):
    small = TinySpec(
        text_hidden=32,
        text_layers=1,
        text_heads=2,
        text_intermediate=64,
        vision_hidden=16,
        vision_heads=2,
        vocab_size=400,
    )
    kwargs = dict(teacher_spec=small, student_spec=small)
    paths = ensure_tiny_models(tmp_path, TEXTS, seed=1, **kwargs)
    root = tmp_path / SUBDIR
    stamp = os.stat(Path(paths["teacher"]) / "model.safetensors").st_mtime_ns
    fingerprint = json.loads((root / FINGERPRINT_FILE).read_text())

    assert ensure_tiny_models(tmp_path, TEXTS, seed=1, **kwargs) == paths  # reuse: nothing rewritten
    assert os.stat(Path(paths["teacher"]) / "model.safetensors").st_mtime_ns == stamp

    ensure_tiny_models(tmp_path, TEXTS + ["a new text"], seed=1, **kwargs)  # corpus changed -> rebuild
    assert json.loads((root / FINGERPRINT_FILE).read_text())["corpus_sha256"] != fingerprint["corpus_sha256"]

    (root / FINGERPRINT_FILE).write_text("{not json")  # damaged cache -> rebuild, same seed -> same weights
    ensure_tiny_models(tmp_path, TEXTS, seed=1, **kwargs)
    assert json.loads((root / FINGERPRINT_FILE).read_text()) == fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == [SUBDIR]  # no temp or stale folders left

    other = ensure_tiny_models(tmp_path / "other", TEXTS, seed=1, **kwargs)  # deterministic under a seed
    a, b = _weights(paths["student"]), _weights(other["student"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokenizers = [(Path(p["student"]) / "tokenizer.json").read_text() for p in (paths, other)]
    assert tokenizers[0] == tokenizers[1]

    with pytest.raises(ValueError, match="vocab_size"):
        ensure_tiny_models(tmp_path, TEXTS, seed=1, teacher_spec=small, student_spec=STUDENT_SPEC)


def test_freeze_for_stage(models):
    model = LlavaForConditionalGeneration.from_pretrained(models["teacher"])
    h_v, h_t = TEACHER_SPEC.vision_hidden, TEACHER_SPEC.text_hidden
    w_params = h_v * h_t + h_t  # the paper's W and its bias: linear_1 only

    counts = freeze_for_stage(model, "align")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_1.bias"}
    assert counts["projector"] == counts["trainable"] == w_params and counts["language_model"] == 0

    counts = freeze_for_stage(model, "tune")
    lm_params = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    assert counts["language_model"] == lm_params and counts["trainable"] == w_params + lm_params
    assert counts["vision_tower"] == 0
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert not model.model.vision_tower.post_layernorm.weight.requires_grad

    # every trainable parameter gets a gradient (DDP fails on step 2 otherwise)
    ids = torch.tensor([[1, *([4] * 16), 50, 60, 2]])  # [batch, seq]
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64), labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    with pytest.raises(ValueError, match="stage"):
        freeze_for_stage(model, "pretrain")


def test_student_with_teacher_vision_takes_the_tower_and_keeps_its_own_lm(models, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from mmdc.world.teacher import student_with_teacher_vision

    out = student_with_teacher_vision(models["student"], models["teacher"], tmp_path)
    assert student_with_teacher_vision(models["student"], models["teacher"], tmp_path) == out  # cached
    made, student, teacher = (
        LlavaForConditionalGeneration.from_pretrained(p) for p in (out, models["student"], models["teacher"])
    )
    for name, w in made.model.vision_tower.state_dict().items():
        assert torch.equal(w, teacher.model.vision_tower.state_dict()[name]), name
    for name, w in made.model.language_model.state_dict().items():
        assert torch.equal(w, student.model.language_model.state_dict()[name]), name
    assert not torch.equal(
        student.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"],
        teacher.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"],
    )
