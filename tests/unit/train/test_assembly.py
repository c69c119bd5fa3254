"""Student assembly from separately saved parts, and the paper's dimension check (no download)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from mmdc.train.assembly import assemble_llava, check_llava_dims, freeze_for_stage

# config.json excerpts of the paper's parts (openai/clip-vit-large-patch14, lmsys/vicuna-7b-v1.1)
VIT_L14 = {"hidden_size": 1024, "image_size": 224, "patch_size": 14, "num_hidden_layers": 24}
VICUNA_7B = {"hidden_size": 4096, "max_position_embeddings": 2048, "vocab_size": 32000}
VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)


def test_paper_dims_vit_l14_vicuna_7b():
    dims = check_llava_dims(VIT_L14, VICUNA_7B, image_size=224, patch_size=14)
    assert dims["image_seq_length"] == 256 and dims["grid"] == 16 and dims["vision_positions"] == 257
    assert (dims["projector_in"], dims["projector_out"]) == (1024, 4096)
    assert dims["text_tokens_left"] == 2048 - 256
    # a whole CLIP config works too (its vision part is used); ViT-L/14-336 -> 576 tokens
    whole = {"vision_config": {**VIT_L14, "image_size": 336}, "text_config": {"hidden_size": 768}}
    assert check_llava_dims(whole, VICUNA_7B, 336, 14)["image_seq_length"] == 576


@pytest.mark.parametrize(
    "vision, text, size, patch, match",
    [
        (VIT_L14, VICUNA_7B, 336, 14, "trained at image_size 224"),
        (VIT_L14, VICUNA_7B, 224, 16, "patch_size 14"),
        ({"hidden_size": 8}, VICUNA_7B, 100, 14, "multiple of patch_size"),
        ({"image_size": 224}, VICUNA_7B, 224, 14, "vision config has no 'hidden_size'"),
        (VIT_L14, {"hidden_size": 64, "max_position_embeddings": 256}, 224, 14, "no room"),
    ],
)
def test_dims_errors(vision, text, size, patch, match):
    with pytest.raises(ValueError, match=match):
        check_llava_dims(vision, text, size, patch)


def _lm_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-like tokenizer: <unk> <s> </s>, BOS on encode, no pad and no image token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(["USER: what is in the image? ASSISTANT: a cat."] * 5, trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    tokenizer = _lm_tokenizer()
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=256,
        )
    )
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(root / "vision")
    clip_text = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=1,
    )
    CLIPModel(CLIPConfig(vision_config=VISION, text_config=clip_text)).save_pretrained(root / "clip")
    return root


@pytest.mark.parametrize("vision_dir", ["vision", "clip"])
def test_assemble_from_parts(parts, tmp_path, vision_dir):
    out = assemble_llava(parts / vision_dir, parts / "lm", tmp_path / "student", projector="linear", seed=3)
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    lm = LlamaForCausalLM.from_pretrained(parts / "lm")
    vision = CLIPVisionModel.from_pretrained(parts / vision_dir)

    # pretrained weights arrive unchanged
    for name, value in vision.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], value), name
    lm_state = model.model.language_model.state_dict()
    for name, value in lm.model.state_dict().items():
        if name != "embed_tokens.weight":
            assert torch.equal(lm_state[name], value), name
    n_old = lm.config.vocab_size
    assert torch.equal(lm_state["embed_tokens.weight"][:n_old], lm.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight[:n_old], lm.lm_head.weight)

    # the image token was added, pad falls back to <unk>, embeddings cover the new vocabulary
    tokenizer = processor.tokenizer
    assert tokenizer.image_token == "<image>" and tokenizer.pad_token == "<unk>"
    assert model.config.image_token_id == tokenizer.image_token_id == n_old
    assert model.config.text_config.vocab_size == len(tokenizer) == n_old + 1
    assert model.config.image_seq_length == 16  # (32 / 8) ** 2
    assert model.generation_config.eos_token_id == 2
    assert tokenizer.image_token_id in model.generation_config.suppress_tokens

    # the projector is the paper's single matrix W: linear_2 is the identity
    projector = model.model.multi_modal_projector
    assert model.config.projector_hidden_act == "linear"
    torch.testing.assert_close(projector.linear_2.weight, torch.eye(32))
    assert freeze_for_stage(model, "align")["trainable"] == 16 * 32 + 32

    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "what is in the image?"}, {"type": "image"}]}],
        add_generation_prompt=True,
    )
    assert prompt.endswith("what is in the image?\n<image> ASSISTANT:")
    batch = processor(images=Image.new("RGB", (40, 50)), text=prompt, return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        out_ids = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out_ids.shape[1] > batch["input_ids"].shape[1]


def test_assemble_mlp_projector_and_seed(parts, tmp_path):
    a = assemble_llava(parts / "vision", parts / "lm", tmp_path / "a", projector="mlp2x_gelu", seed=1)
    b = assemble_llava(parts / "vision", parts / "lm", tmp_path / "b", projector="mlp2x_gelu", seed=1)
    pa = LlavaForConditionalGeneration.from_pretrained(a).model.multi_modal_projector
    pb = LlavaForConditionalGeneration.from_pretrained(b).model.multi_modal_projector
    assert LlavaForConditionalGeneration.from_pretrained(a).config.projector_hidden_act == "gelu"
    assert torch.equal(pa.linear_1.weight, pb.linear_1.weight) and torch.equal(pa.linear_2.weight, pb.linear_2.weight)


def test_assemble_rejects_other_image_size(parts, tmp_path):
    with pytest.raises(ValueError, match="trained at image_size 32"):
        assemble_llava(parts / "vision", parts / "lm", tmp_path / "x", image_size=64)
    with pytest.raises(ValueError, match="projector"):
        assemble_llava(parts / "vision", parts / "lm", tmp_path / "y", projector="conv")


def test_assembles_in_the_training_dtype(parts, tmp_path):
    """Defect a: assembly always ran in fp32, whatever the training precision: a 7B student was 26 GiB in the
    assembling process and 28 GB on disk, twice what fp16 training needs."""
    from safetensors import safe_open

    out = assemble_llava(parts / "vision", parts / "lm", tmp_path / "student", dtype="float16")
    with safe_open(f"{out}/model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.float16 and model.config.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        assemble_llava(parts / "vision", parts / "lm", tmp_path / "x", dtype="int8")
