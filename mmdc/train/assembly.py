"""Assemble the student from pretrained parts: CLIP vision tower + fresh projector W + causal LM.

The paper's student (DiLLaVA-7B, section 3.1) is CLIP ViT-L/14 and Vicuna-7B-1.1
joined by a projection matrix W trained from scratch in stage 1. We build it as
an HF ``LlavaForConditionalGeneration`` and save it in HF format with its
``LlavaProcessor``, so one checkpoint is trained by Ray Train, served by either
backend and evaluated, exactly like the teacher.

This module also holds the LLaVA wiring that the tiny models (``tiny.py``)
share: the config (features from the vision tower's second-to-last layer, CLS
dropped, one image token per patch), the processor, the generation config, the
projector initialisation and a check that the processor and the model agree on
how many tokens an image takes.

The projector. HF's ``LlavaMultiModalProjector`` is always
``linear_2(act(linear_1(x)))``. For ``"mlp2x_gelu"`` (LLaVA-1.5) ``act`` is GELU.
For the paper's ``"linear"`` W, ``act`` is the identity (``ACT2FN["linear"]``),
``linear_2`` starts as the identity matrix with zero bias and never trains
(``freeze_for_stage``), so the trainable projector is exactly one matrix W and a
bias, ``[vision_hidden -> text_hidden]``, as in LLaVA-1. Note: vLLM's LLaVA
cannot load ``projector_hidden_act="linear"`` (its activation registry has no
identity); serve such a student with the transformers backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.activations import ACT2FN

from mmdc.train.templates import CHAT_TEMPLATE, IMAGE_TOKEN, STOP_TOKEN

Projector = Literal["linear", "mlp2x_gelu"]
PROJECTOR_ACT: dict[str, str] = {"linear": "linear", "mlp2x_gelu": "gelu"}
assert all(act in ACT2FN for act in PROJECTOR_ACT.values()), "this transformers lacks an activation we rely on"
VISION_FEATURE_LAYER = -2  # LLaVA reads the second-to-last CLIP layer
VISION_FEATURE_SELECT = "default"  # drop CLS: one image token per patch


def check_llava_dims(
    vision_cfg: Mapping[str, Any], text_cfg: Mapping[str, Any], image_size: int, patch_size: int
) -> dict[str, int]:
    """Check that a vision tower and an LM fit together at ``image_size``; return the derived sizes.

    Pure: works on config dicts (``config.json`` contents), so the paper's
    configuration can be checked without downloading weights. ``vision_cfg`` may
    be a CLIP vision config or a whole CLIP config (its ``vision_config`` is used).
    ViT-L/14 at 224 px with Vicuna-7B gives 256 image tokens and a 1024 -> 4096 W.
    """
    vision = vision_cfg.get("vision_config", vision_cfg) if isinstance(vision_cfg, Mapping) else None
    if not isinstance(vision, Mapping) or not isinstance(text_cfg, Mapping):
        raise TypeError("check_llava_dims takes config dicts (config.json contents)")
    for name, cfg in (("vision config", vision), ("text config", text_cfg)):
        if "hidden_size" not in cfg:
            raise ValueError(f"{name} has no 'hidden_size' key (keys: {sorted(cfg)})")
    if image_size <= 0 or patch_size <= 0 or image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a positive multiple of patch_size {patch_size}")
    if "patch_size" in vision and vision["patch_size"] != patch_size:
        raise ValueError(f"vision config has patch_size {vision['patch_size']}, asked for {patch_size}")
    if "image_size" in vision and vision["image_size"] != image_size:
        raise ValueError(
            f"vision config was trained at image_size {vision['image_size']}, asked for {image_size}: "
            "its position embeddings only cover the trained patch grid"
        )
    grid = image_size // patch_size
    num_patches = grid * grid
    image_seq_length = num_patches  # CLS dropped by the "default" strategy
    max_positions = int(text_cfg.get("max_position_embeddings", 0))
    if max_positions and image_seq_length >= max_positions:
        raise ValueError(f"{image_seq_length} image tokens leave no room in {max_positions} text positions")
    return {
        "image_size": image_size,
        "patch_size": patch_size,
        "grid": grid,
        "num_patches": num_patches,
        "vision_positions": num_patches + 1,  # + CLS
        "image_seq_length": image_seq_length,
        "vision_hidden": int(vision["hidden_size"]),
        "text_hidden": int(text_cfg["hidden_size"]),
        "projector_in": int(vision["hidden_size"]),
        "projector_out": int(text_cfg["hidden_size"]),
        "max_position_embeddings": max_positions,
        "text_tokens_left": max_positions - image_seq_length if max_positions else 0,
    }


def make_llava_config(
    vision_config: PretrainedConfig,
    text_config: PretrainedConfig,
    image_token_id: int,
    projector: Projector,
    image_size: int,
) -> LlavaConfig:
    """LlavaConfig with LLaVA's choices; ``image_seq_length`` derived by ``check_llava_dims``."""
    if projector not in PROJECTOR_ACT:
        raise ValueError(f"projector must be one of {sorted(PROJECTOR_ACT)}, got {projector!r}")
    dims = check_llava_dims(vision_config.to_dict(), text_config.to_dict(), image_size, vision_config.patch_size)
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=dims["image_seq_length"],
        projector_hidden_act=PROJECTOR_ACT[projector],
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy=VISION_FEATURE_SELECT,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def init_projector(model: LlavaForConditionalGeneration) -> None:
    """For a "linear" projector, make linear_2 the identity so linear_1 alone is the paper's W."""
    if model.config.projector_hidden_act != "linear":
        return
    linear_2 = model.model.multi_modal_projector.linear_2  # [text_hidden, text_hidden]
    with torch.no_grad():
        linear_2.weight.copy_(torch.eye(linear_2.out_features, dtype=linear_2.weight.dtype))
        if linear_2.bias is not None:
            linear_2.bias.zero_()


def make_llava_processor(
    tokenizer: PreTrainedTokenizerBase,
    image_size: int,
    patch_size: int,
    chat_template: str = CHAT_TEMPLATE,
    image_processor: CLIPImageProcessorPil | None = None,
) -> LlavaProcessor:
    """LlavaProcessor whose <image> expands to one token per patch at ``image_size``.

    CLIP preprocessing (resize shortest edge, centre crop, CLIP mean/std), as
    LLaVA-1 does. ``num_additional_image_tokens=1`` counts CLIP's CLS, which the
    "default" strategy then drops again: leaving it at 0 (the processor's default)
    expands <image> to one token too few.
    """
    if image_processor is None:
        image_processor = CLIPImageProcessorPil()
    image_processor.size = {"shortest_edge": image_size}
    image_processor.crop_size = {"height": image_size, "width": image_size}
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=VISION_FEATURE_SELECT,
        chat_template=chat_template,
        num_additional_image_tokens=1,
    )


def check_image_token_count(processor: LlavaProcessor, image_seq_length: int) -> None:
    """Fail early if the processor expands <image> to a count the model does not expect.

    The two numbers live in different objects (processor: patch size, extra
    tokens, select strategy; model: image_seq_length); a mismatch otherwise only
    shows at the first forward pass, on a GPU, hours into a run.
    """
    size = processor.image_processor.crop_size
    image = Image.new("RGB", (size["width"], size["height"]))
    batch = processor(images=image, text=processor.image_token, return_tensors="pt")
    count = int((batch["input_ids"] == processor.image_token_id).sum())
    if count != image_seq_length:
        raise ValueError(
            f"processor expands {processor.image_token} to {count} tokens, model expects {image_seq_length}"
        )


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """Id of a single token, or a clear error when the tokenizer lacks it."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no single token {token!r} (encodes to {ids})")
    return int(ids[0])


def make_generation_config(tokenizer: PreTrainedTokenizerBase, stop_token: str = STOP_TOKEN) -> GenerationConfig:
    """Stop at ``stop_token``; never emit the image token, padding, BOS or <unk>.

    A generated <image> fed back into a later prompt (the referee reads the
    student's answer) would break the image-token count, so it is suppressed.
    """
    eos_id = token_id(tokenizer, stop_token)
    image_id = getattr(tokenizer, "image_token_id", None)
    suppress = {image_id, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
    suppress -= {None, eos_id}
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=sorted(int(i) for i in suppress),
    )


def _load_image_processor(vision_tower: str) -> CLIPImageProcessorPil | None:
    try:
        return CLIPImageProcessorPil.from_pretrained(vision_tower)
    except (OSError, ValueError):  # a bare vision-model folder has no preprocessor_config.json
        return None


def torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float16`` for ``"float16"`` (or a torch dtype as it is); ValueError for anything else."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return value


def assemble_llava(
    vision_tower: str | os.PathLike,
    language_model: str | os.PathLike,
    out_dir: str | os.PathLike,
    projector: Projector = "linear",
    image_size: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    chat_template: str = CHAT_TEMPLATE,
    seed: int = 0,
    stop_token: str = STOP_TOKEN,
) -> str:
    """Build the student from a CLIP vision tower and a causal LM (paths or hub ids); save it; return out_dir.

    The pretrained weights are loaded in ``dtype`` (a torch dtype or its name, e.g. ``"float16"``: the
    training precision, so a 7B student is 13 GiB, not 26, in memory and on disk) and moved into the
    LLaVA model as they are (no copy: a 7B LM is never held twice); only the projector is new (seeded).
    The LM's tokenizer gains the image token (embeddings resized, new rows sampled around the mean of
    the old ones) and, if it has none, a pad token (its <unk>, as LLaVA does). ``image_size`` defaults
    to the vision tower's own and must equal it. Memory: the weights in ``dtype`` plus transients
    (``mmdc.sizing.memory.assembly``); the driver runs this in a Ray task that asks for them
    (``mmdc/actors/assembly.py``).
    """
    if projector not in PROJECTOR_ACT:
        raise ValueError(f"projector must be one of {sorted(PROJECTOR_ACT)}, got {projector!r}")
    dtype = torch_dtype(dtype)
    vision_tower, language_model = str(vision_tower), str(language_model)
    vision = CLIPVisionModel.from_pretrained(vision_tower, dtype=dtype)
    size = int(image_size or vision.config.image_size)
    if size != vision.config.image_size:  # fail before loading a 7B LM
        check_llava_dims(vision.config.to_dict(), {"hidden_size": 0}, size, vision.config.patch_size)
    lm = AutoModelForCausalLM.from_pretrained(language_model, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(language_model, extra_special_tokens={"image_token": IMAGE_TOKEN})
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"  # batched generation; training collators pad explicitly
    image_token_id = token_id(tokenizer, IMAGE_TOKEN)
    token_id(tokenizer, stop_token)  # the template's stop token must be one token of this vocabulary
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))

    config = make_llava_config(vision.config, lm.config, image_token_id, projector, size)
    config.dtype = dtype
    with torch.device("meta"):  # skeleton only: the real weights are moved in below
        model = LlavaForConditionalGeneration(config)
    expected_keys = set(model.state_dict())
    for name, part, slot in (
        ("vision tower", vision, model.model.vision_tower),
        ("language model", lm.base_model, model.model.language_model),
    ):
        if type(part) is not type(slot):
            raise TypeError(f"{name}: LLaVA expects {type(slot).__name__}, {name} loads as {type(part).__name__}")
    model.model.vision_tower = vision
    model.model.language_model = lm.base_model
    model.lm_head = lm.get_output_embeddings()
    with torch.random.fork_rng(devices=[]):  # seed the projector without touching the caller's RNG
        torch.manual_seed(seed)
        model.model.multi_modal_projector = type(model.model.multi_modal_projector)(config).to(dtype)
    init_projector(model)
    if config.tie_word_embeddings:
        model.tie_weights()
    if set(model.state_dict()) != expected_keys:
        missing = sorted(expected_keys - set(model.state_dict()))[:5]
        raise RuntimeError(f"assembled model does not match the LLaVA layout; e.g. missing {missing}")
    if any(p.is_meta for p in model.parameters()):
        raise RuntimeError("assembled model still has uninitialised (meta) parameters")
    model.generation_config = make_generation_config(tokenizer, stop_token)
    model.eval()

    processor = make_llava_processor(
        tokenizer, size, vision.config.patch_size, chat_template, _load_image_processor(vision_tower)
    )
    check_image_token_count(processor, config.image_seq_length)
    return save_llava(model, processor, out_dir)


def freeze_for_stage(model: LlavaForConditionalGeneration, stage: Literal["align", "tune"]) -> dict[str, int]:
    """Set requires_grad for a training stage; return trainable parameter counts per part and in total.

    "align" (stage 1): only the projector W trains. "tune" (stage 2): the vision
    tower stays frozen, projector and language model (with its LM head) train.
    The whole vision tower is frozen in both, including CLIP's post_layernorm,
    which LLaVA never uses (features come from a hidden layer) and which makes
    DDP fail on step 2 with an unused-parameter error when left trainable. A
    "linear" projector's linear_2 is the fixed identity (``init_projector``) and
    stays frozen. Call this before wrapping the model with peft, which then
    freezes the base weights it adapts.
    """
    if stage not in ("align", "tune"):
        raise ValueError(f"stage must be 'align' or 'tune', got {stage!r}")
    projector = model.model.multi_modal_projector
    projector_modules = [projector.linear_1] if model.config.projector_hidden_act == "linear" else [projector]
    parts = {
        "vision_tower": ([model.model.vision_tower], False),
        "projector": (projector_modules, True),
        "language_model": ([model.model.language_model, model.lm_head], stage == "tune"),
    }
    model.requires_grad_(False)
    counts: dict[str, int] = {}
    for name, (modules, trains) in parts.items():
        params = {id(p): p for module in modules for p in module.parameters()}  # dedupe tied weights
        for param in params.values():
            param.requires_grad_(trains)
        counts[name] = sum(p.numel() for p in params.values()) if trains else 0
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def save_llava(model: Any, processor: Any, out_dir: str | Path) -> str:
    """Save model and processor in HF format into one folder (what every engine and trainer loads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)
