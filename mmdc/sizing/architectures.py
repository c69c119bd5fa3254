"""Model sizes from the real architectures: published config values, built on the meta device.

A plan needs each model's parameter count, its largest layer (DeepSpeed's ZeRO-3 estimator), the
trainable share per stage and the dimensions that size a KV cache or an activation. All of them
come from building the model with transformers on the ``meta`` device, which allocates nothing and
takes well under a second for a 13B LLaVA, from its ``config.json`` values:

- **published**: the size-relevant values of the models the paper names, copied from their
  ``config.json`` on the Hugging Face hub (``PUBLISHED_CONFIGS``), so nothing is downloaded;
- **local**: a folder with a ``config.json`` (a checkpoint of a run, a downloaded model);
- **--model-config ID=PATH**: a ``config.json`` (or a folder with one) for an id the plan does not
  know and cannot read locally;
- **tiny**: the embedded default's ``tiny:*`` models, whose configs are built from the same specs
  and in the same way as the world wing's builder (``mmdc/world/tiny.py``; mirrored here because
  sizing sits below it, and a test keeps the two equal);
- **assemble**: the student built from ``models.vision_tower`` + ``models.language_model`` +
  ``models.projector``, as ``mmdc/train/assembly.py`` wires it (the LM's vocabulary gains the image
  token; the projector is ``linear_1`` -> act -> ``linear_2``).

Every resolved model says which of these it came from (``Architecture.source``).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------
# Published config.json values (the keys that decide sizes), keyed by Hugging Face id
# --------------------------------------------------------------------------------------------

# openai/clip-vit-large-patch14{,-336} config.json "vision_config" (the student and LLaVA-1.5 use
# only the vision tower); CLIP's checkpoints are stored in fp32.
_CLIP_L14 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
}
_CLIP_L14_336 = {**_CLIP_L14, "image_size": 336}
# LLaMA-7B (huggyllama/llama-7b, lmsys/vicuna-7b-v1.1 config.json): 4096 wide, 32 layers, 32 heads.
_LLAMA_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
_LLAMA_13B = {
    **_LLAMA_7B,
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
}


def _llava(text: Mapping[str, Any]) -> dict[str, Any]:
    """llava-hf/llava-1.5-*-hf config.json: CLIP ViT-L/14-336 + mlp2x_gelu projector + Vicuna v1.5 (vocab 32064)."""
    return {
        "model_type": "llava",
        "projector_hidden_act": "gelu",
        "image_token_index": 32000,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": 576,
        "torch_dtype": "float16",
        "vision_config": dict(_CLIP_L14_336),
        "text_config": {**text, "max_position_embeddings": 4096, "vocab_size": 32064},
    }


PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14": {"model_type": "clip", "torch_dtype": "float32", "vision_config": _CLIP_L14},
    "openai/clip-vit-large-patch14-336": {
        "model_type": "clip",
        "torch_dtype": "float32",
        "vision_config": _CLIP_L14_336,
    },
    "huggyllama/llama-7b": _LLAMA_7B,
    "lmsys/vicuna-7b-v1.1": _LLAMA_7B,
    "lmsys/vicuna-7b-v1.3": _LLAMA_7B,
    "lmsys/vicuna-7b-v1.5": {**_LLAMA_7B, "max_position_embeddings": 4096},
    "lmsys/vicuna-13b-v1.5": {**_LLAMA_13B, "max_position_embeddings": 4096},
    "llava-hf/llava-1.5-7b-hf": _llava(_LLAMA_7B),
    "llava-hf/llava-1.5-13b-hf": _llava(_LLAMA_13B),
}

# Published parameter counts (what the model cards / papers state), for the tests' comparison.
PUBLISHED_PARAMS: dict[str, tuple[float, str]] = {
    "openai/clip-vit-large-patch14": (303.2e6, "CLIP ViT-L/14 image encoder, ~303M (open_clip / timm model cards)"),
    "huggyllama/llama-7b": (6.74e9, "LLaMA-7B: 6.7B (Touvron et al. 2023, Table 2); 6.74B on the HF card"),
    "lmsys/vicuna-7b-v1.1": (6.74e9, "Vicuna-7B: a LLaMA-7B fine-tune, 6.74B on the HF card"),
    "llava-hf/llava-1.5-7b-hf": (7.06e9, "llava-1.5-7b-hf: 7.06B on the HF card"),
    "llava-hf/llava-1.5-13b-hf": (13.35e9, "llava-1.5-13b-hf: 13.4B on the HF card (13.35B)"),
}

# --------------------------------------------------------------------------------------------
# tiny:* models (the embedded default), mirrored from mmdc/world/tiny.py TinySpec
# --------------------------------------------------------------------------------------------

# TinySpec values of TEACHER_SPEC and STUDENT_SPEC (tests/unit/sizing/test_architectures.py keeps them equal).
# vocab_size is the BPE target: a built model has len(tokenizer) <= this, so its count can only be lower.
TINY_TEACHER = {
    "image_size": 64,
    "patch_size": 16,
    "vision_hidden": 64,
    "vision_layers": 3,
    "vision_heads": 2,
    "text_hidden": 256,
    "text_layers": 4,
    "text_heads": 4,
    "text_intermediate": 512,
    "vocab_size": 2048,
    "projector": "linear",
    "max_position_embeddings": 2048,
}
TINY_STUDENT = {**TINY_TEACHER, "text_hidden": 128, "text_layers": 2, "text_heads": 2, "text_intermediate": 256}
TINY_MODELS = {
    "tiny:teacher": TINY_TEACHER,
    "tiny:teacher-short": TINY_TEACHER,
    "tiny:random-teacher": TINY_TEACHER,
    "tiny:student": TINY_STUDENT,
}

PROJECTOR_ACT = {"linear": "linear", "mlp2x_gelu": "gelu"}  # as mmdc/train/assembly.py PROJECTOR_ACT


def tiny_config(spec: Mapping[str, Any], vocab_size: int | None = None) -> dict[str, Any]:
    """The LLaVA config dict ``build_tiny_llava`` makes from a TinySpec (its CLIPVisionConfig / LlamaConfig args)."""
    vocab = int(vocab_size or spec["vocab_size"])
    grid = spec["image_size"] // spec["patch_size"]
    return {
        "model_type": "llava",
        "projector_hidden_act": PROJECTOR_ACT[spec["projector"]],
        "image_token_index": 4,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": grid * grid,
        "torch_dtype": "float32",
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": spec["vision_hidden"],
            "intermediate_size": 4 * spec["vision_hidden"],
            "projection_dim": spec["vision_hidden"],
            "num_hidden_layers": spec["vision_layers"],
            "num_attention_heads": spec["vision_heads"],
            "image_size": spec["image_size"],
            "patch_size": spec["patch_size"],
        },
        "text_config": {
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": spec["text_hidden"],
            "intermediate_size": spec["text_intermediate"],
            "num_hidden_layers": spec["text_layers"],
            "num_attention_heads": spec["text_heads"],
            "max_position_embeddings": spec["max_position_embeddings"],
            "tie_word_embeddings": False,
        },
    }


# --------------------------------------------------------------------------------------------
# Resolved sizes
# --------------------------------------------------------------------------------------------


class ModelNotFound(LookupError):
    """A model id the plan cannot size offline; the message says how to supply its config."""


@dataclass(frozen=True)
class TextDims:
    """The language model's shape: what a KV cache, an activation or a FLOP count is made of."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, per byte of dtype: 2 x layers x kv_heads x head_dim."""
        return 2 * self.layers * self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Architecture:
    """One resolved model: where its config came from, its parameter counts and its dimensions."""

    spec: str  # as the config names it (HF id, path, tiny:..., or "assemble")
    source: str  # where the config values came from
    kind: str  # llava | llama | clip_vision_model
    checkpoint_dtype: str  # the dtype its weights are stored in (what dtype: auto loads)
    total: int  # parameters, tied weights counted once
    vision: int = 0  # vision tower
    projector: int = 0  # multi-modal projector (linear_1 + linear_2)
    projector_trainable: int = 0  # what trains of it (a "linear" projector's linear_2 is a fixed identity)
    language: int = 0  # language model incl. embeddings and LM head
    largest_layer: int = 0  # parameters of the largest single module (DeepSpeed's ZeRO-3 estimator input)
    text: TextDims | None = None
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_layers: int = 0
    image_size: int = 0
    patch_size: int = 0
    image_tokens: int = 0  # tokens one image takes in the LM's sequence (patches; CLS dropped)
    projector_act: str = ""  # "linear" (the paper's W) or "gelu" (mlp2x_gelu)
    # per LM linear kind (q_proj, ...): (in_features, out_features, how many) -- LoRA counts come from these
    linears: tuple[tuple[str, int, int, int], ...] = field(default=(), repr=False)

    def trainable(self, stage: str, lora_targets: tuple[str, ...] = (), lora_r: int = 0) -> int:
        """Trainable parameters in a stage, as ``freeze_for_stage`` (+ LoRA in the loop) sets them.

        align: the projector only (a "linear" projector's linear_1). tune: projector and language model
        (with its head), or with LoRA the adapters on the LM's ``lora_targets`` plus the whole projector
        (peft's modules_to_save).
        """
        if stage == "align":
            return self.projector_trainable
        if lora_r:
            return self.lora_params(lora_targets, lora_r) + self.projector
        return self.projector_trainable + self.language

    def lora_params(self, targets: tuple[str, ...], r: int) -> int:
        """LoRA A and B matrices, r x (in + out), on every LM linear whose name is in ``targets``."""
        return sum(r * (fan_in + fan_out) * n for name, fan_in, fan_out, n in self.linears if name in targets)


def _config_object(tree: Mapping[str, Any]):
    """A transformers config object from config.json contents (nested dicts become sub-configs)."""
    from transformers import AutoConfig

    tree = dict(tree)
    model_type = tree.pop("model_type", None)
    if not model_type:
        raise ValueError("config has no model_type")
    return AutoConfig.for_model(model_type, **tree)


def _dtype_name(tree: Mapping[str, Any]) -> str:
    value = tree.get("dtype") or tree.get("torch_dtype") or "float32"
    return str(value).replace("torch.", "")


@functools.lru_cache(maxsize=64)
def _measure(tree_json: str) -> dict[str, Any]:
    """Build the model on the meta device and read its counts and shapes (cached per config)."""
    import torch
    from transformers import CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

    tree = json.loads(tree_json)
    kind = tree["model_type"]
    config = _config_object(tree)
    with torch.device("meta"):  # no memory is allocated, no weights initialised
        if kind == "llava":
            model = LlavaForConditionalGeneration(config)
        elif kind == "llama":
            model = LlamaForCausalLM(config)
        elif kind in ("clip", "clip_vision_model"):
            model = CLIPVisionModel(config.vision_config if kind == "clip" else config)
            kind = "clip_vision_model"
        else:
            raise ValueError(f"model_type {kind!r}: the plan sizes llava, llama and clip models")

    def count(module) -> int:
        return sum({id(p): p.numel() for p in module.parameters()}.values())  # tied weights once

    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    out: dict[str, Any] = {"kind": kind, "total": count(model), "largest_layer": largest}
    if kind == "clip_vision_model":
        out["vision"] = out["total"]
        return out
    lm_root = model.model.language_model if kind == "llava" else model.model
    linears: dict[str, list[int]] = {}
    for name, module in lm_root.named_modules():
        if isinstance(module, torch.nn.Linear):
            entry = linears.setdefault(name.rsplit(".", 1)[-1], [module.in_features, module.out_features, 0])
            entry[2] += 1
    out["linears"] = tuple((n, i, o, c) for n, (i, o, c) in sorted(linears.items()))
    text = config.text_config if kind == "llava" else config
    heads = int(text.num_attention_heads)
    out["text"] = TextDims(
        hidden=int(text.hidden_size),
        intermediate=int(text.intermediate_size),
        layers=int(text.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        vocab=int(text.vocab_size),
        max_positions=int(getattr(text, "max_position_embeddings", 0) or 0),
    )
    if kind == "llama":
        out["language"] = out["total"]
        return out
    projector = model.model.multi_modal_projector
    vision = config.vision_config
    grid = int(vision.image_size) // int(vision.patch_size)
    linear = config.projector_hidden_act == "linear"
    out.update(
        vision=count(model.model.vision_tower),
        projector=count(projector),
        projector_trainable=count(projector.linear_1) if linear else count(projector),
        language=count(model.model.language_model) + count(model.lm_head),
        vision_hidden=int(vision.hidden_size),
        vision_intermediate=int(vision.intermediate_size),
        vision_layers=int(vision.num_hidden_layers),
        image_size=int(vision.image_size),
        patch_size=int(vision.patch_size),
        image_tokens=grid * grid,
        projector_act=str(config.projector_hidden_act),
    )
    return out


def measure(spec: str, source: str, tree: Mapping[str, Any]) -> Architecture:
    """Size the model that config.json contents ``tree`` describe."""
    data = _measure(json.dumps(tree, sort_keys=True))
    return Architecture(spec=spec, source=source, checkpoint_dtype=_dtype_name(tree), **data)


def _read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    try:
        tree = json.loads(p.read_text())
    except OSError as err:
        raise ModelNotFound(f"cannot read {p}: {err.strerror or err}") from err
    except ValueError as err:
        raise ModelNotFound(f"{p} is not valid JSON: {err}") from err
    if not isinstance(tree, dict) or "model_type" not in tree:
        raise ModelNotFound(f"{p} is not a transformers config.json (no model_type)")
    return tree


def config_tree(spec: str, model_configs: Mapping[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """config.json contents for ``spec`` and where they came from, without touching the network.

    Order: a ``--model-config`` entry, a ``tiny:*`` spec, a local folder (or config.json file), the
    published table. Raises ModelNotFound saying how to supply the config.
    """
    model_configs = model_configs or {}
    if spec in model_configs:
        path = model_configs[spec]
        return _read_config_json(path), f"--model-config {path}"
    if spec in TINY_MODELS:
        name = "TEACHER_SPEC" if TINY_MODELS[spec] is TINY_TEACHER else "STUDENT_SPEC"
        return tiny_config(TINY_MODELS[spec]), f"tiny spec ({name} of mmdc/world/tiny.py, vocab <= 2048)"
    local = Path(spec).expanduser()
    if (local.is_dir() and (local / "config.json").is_file()) or (local.is_file() and local.suffix == ".json"):
        return _read_config_json(local), f"local config.json: {local / 'config.json' if local.is_dir() else local}"
    if spec in PUBLISHED_CONFIGS:
        return PUBLISHED_CONFIGS[spec], "published config.json values (mmdc/sizing/architectures.py)"
    if spec.startswith("tiny:"):
        raise ModelNotFound(f"unknown tiny model {spec!r} (known: {', '.join(TINY_MODELS)})")
    raise ModelNotFound(
        f"cannot size {spec!r} offline: not a local folder with config.json and not in the "
        f"published table; pass --model-config {spec}=PATH/TO/config.json"
    )


def resolve(spec: str, model_configs: Mapping[str, str] | None = None) -> Architecture:
    """Size one model named by the config (HF id, local path, tiny:*)."""
    tree, source = config_tree(spec, model_configs)
    return measure(spec, source, tree)


def assemble(
    vision_tower: str,
    language_model: str,
    projector: str,
    model_configs: Mapping[str, str] | None = None,
    dtype: str = "float32",
) -> Architecture:
    """Size the student that ``models.student_init: assemble`` builds (mmdc/train/assembly.py) in ``dtype``."""
    vision_tree, vision_source = config_tree(vision_tower, model_configs)
    text_tree, text_source = config_tree(language_model, model_configs)
    vision = vision_tree.get("vision_config", vision_tree) if vision_tree["model_type"] == "clip" else vision_tree
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ModelNotFound(f"models.vision_tower {vision_tower!r} is not a CLIP vision model")
    if text_tree["model_type"] == "llava":
        raise ModelNotFound(f"models.language_model {language_model!r} is a LLaVA model, not a causal LM")
    # assemble_llava adds <image> to the LM's tokenizer (its pad is its <unk>): one more embedding row
    # and LM head row, assuming the tokenizer is as long as the vocabulary (true of LLaMA / Vicuna).
    text = {**text_tree, "vocab_size": int(text_tree.get("vocab_size", 32000)) + 1}
    grid = int(vision["image_size"]) // int(vision["patch_size"])
    tree = {
        "model_type": "llava",
        "projector_hidden_act": PROJECTOR_ACT[projector],
        "image_token_index": text["vocab_size"] - 1,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": grid * grid,
        "torch_dtype": dtype,  # the saved student's dtype (models.assemble_dtype): what engines' dtype auto loads
        "vision_config": {**vision, "model_type": "clip_vision_model"},
        "text_config": text,
    }
    source = (
        f"assembled: {vision_tower} [{vision_source}] + {projector} projector + "
        f"{language_model} [{text_source}], vocab +1 for <image>"
    )
    return measure("assemble", source, tree)
