"""Tiny LLaVA-architecture models, built and saved locally: the embedded default's teacher and student.

The laptop path (``python -m mmdc.run`` on a CPU, no internet) must run the very
code the cluster runs, so its models have the real architecture and the real
file format: a ``LlavaForConditionalGeneration`` (CLIP vision tower ->
projector -> Llama LM) saved with ``save_pretrained`` next to its
``LlavaProcessor``, loadable by ``from_pretrained`` / ``AutoProcessor`` and by
every serving backend. Only the sizes are tiny (a 64 px image is 16 patches,
the teacher has ~3-4M parameters, the student ~1M), and the
weights are random: the pipeline's plumbing is what they exercise, not
answer quality.

The tokenizer is a byte-level BPE trained here on the run's own texts (plus the
Table 6 prompts and the chat template's words), so no vocabulary is
downloaded. Teacher and student share it, as distillation needs.

``ensure_tiny_models`` builds both once per (specs, seed, corpus) and reuses
them afterwards; ``freeze_for_stage`` sets which parameters train in stage 1
(align: projector only) and stage 2 (tune: projector + LM).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast

from mmdc.train.assembly import (  # noqa: F401  (freeze_for_stage re-exported: the tiny and real students share it)
    PROJECTOR_ACT,
    Projector,
    check_image_token_count,
    freeze_for_stage,
    init_projector,
    make_generation_config,
    make_llava_config,
    make_llava_processor,
    save_llava,
    token_id,
)
from mmdc.train.templates import ASSISTANT_ROLE, CHAT_TEMPLATE, DEFAULT_SYSTEM, IMAGE_TOKEN, STOP_TOKEN, USER_ROLE

# Bump when the build changes in a way that makes old built models stale.
BUILDER_VERSION = 1
FINGERPRINT_FILE = "fingerprint.json"
SUBDIR = "tiny_llava"

UNK_TOKEN, BOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "<pad>"
EOS_TOKEN = STOP_TOKEN
# Order fixes the ids: <unk>=0 <s>=1 </s>=2 <pad>=3 <image>=4.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)

# The Table 6 prompt constants of mmdc.roles that go into every tokenizer corpus.
_ROLE_PROMPT_NAMES = (
    "TEACHER_SYSTEM",
    "TEACHER_USER",
    "REFEREE_SYSTEM",
    "REFEREE_USER",
    "AUGMENTOR_SYSTEM",
    "AUGMENTOR_USER",
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of one tiny LLaVA model (the student's and teacher's specs are below)."""

    image_size: int = 64  # pixels per side; image_size // patch_size squared = image tokens
    patch_size: int = 16  # 64 / 16 -> 4 x 4 = 16 image tokens
    vision_hidden: int = 64  # CLIP vision width
    vision_layers: int = 2  # >= 2: LLaVA reads the second-to-last layer
    vision_heads: int = 2
    text_hidden: int = 256  # Llama width
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 512  # Llama MLP width
    vocab_size: int = 2048  # BPE target; the model gets len(tokenizer), which may be smaller on a small corpus
    projector: Projector = "linear"  # "linear" (the paper's W) or "mlp2x_gelu"
    max_position_embeddings: int = 2048  # RoPE: costs no parameters

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_layers < 2:
            raise ValueError("vision_layers must be >= 2: LLaVA takes features from the second-to-last layer")
        if self.vision_hidden % self.vision_heads or self.text_hidden % self.text_heads:
            raise ValueError("hidden sizes must be multiples of their head counts")
        if self.projector not in PROJECTOR_ACT:
            raise ValueError(f"projector must be one of {sorted(PROJECTOR_ACT)}, got {self.projector!r}")

    @property
    def image_seq_length(self) -> int:
        """Image tokens per image: one per patch (CLIP's CLS is dropped by the "default" strategy)."""
        return (self.image_size // self.patch_size) ** 2


# 3 vision layers: LLaVA reads the second-to-last layer, so 3 give 2 working ones, which the world teacher
# needs to bind shapes to colours (its vision is trained). The student's tower has the same shape because,
# as in the paper (CLIP ViT-L/14 in both LLaVA-13B and the student), the student starts from the
# teacher's vision tower (``mmdc.world.teacher.student_with_teacher_vision``); its LM is smaller.
TEACHER_SPEC = TinySpec(vision_layers=3)
STUDENT_SPEC = TinySpec(vision_layers=3, text_hidden=128, text_layers=2, text_heads=2, text_intermediate=256)


def role_prompt_texts() -> list[str]:
    """The Table 6 prompts from mmdc.roles, or [] when that module is not there."""
    try:
        from mmdc import roles
    except ImportError:
        return []
    return [getattr(roles, name) for name in _ROLE_PROMPT_NAMES if isinstance(getattr(roles, name, None), str)]


def tokenizer_corpus(texts: Iterable[str], extra_texts: Sequence[str] = ()) -> list[str]:
    """The texts a tiny tokenizer trains on: the caller's, the template's words, the Table 6 prompts, extras."""
    corpus = [DEFAULT_SYSTEM, f"{USER_ROLE}: {ASSISTANT_ROLE}:", *role_prompt_texts(), *extra_texts]
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenizer corpus text {index} is {type(text).__name__}, expected str")
        corpus.append(text)
    return corpus


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = TEACHER_SPEC.vocab_size, extra_texts: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with the tokenizers library, ready for LlavaProcessor.

    Byte-level means any text encodes (no <unk> in practice). Special tokens:
    <unk> <s> </s> <pad> and the image token, registered as ``image_token`` in
    ``extra_special_tokens`` so LlavaProcessor finds it. BOS is added on encode
    (like Llama tokenizers); the chat template holds none. Padding is on the
    left, which batched generation needs; training collators pad explicitly.
    """
    return _train_bpe(tokenizer_corpus(texts, extra_texts), vocab_size)


def _train_bpe(corpus: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train the BPE on exactly ``corpus`` (see ``train_tokenizer``)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is below the 256 byte symbols + {len(SPECIAL_TOKENS)} specials")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    bos_id = bpe.token_to_id(BOS_TOKEN)
    bpe.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=TEACHER_SPEC.max_position_embeddings,
    )


def build_tiny_llava(out_dir: str | os.PathLike, spec: TinySpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> str:
    """Build a random-weight tiny LLaVA and save model + processor under ``out_dir``; return the path.

    The LLaVA wiring (feature layer, CLS dropped, image token count, projector,
    processor, generation config) is the real student's, from ``assembly``; only
    the sizes are tiny. The generation config stops at </s> and never emits
    <image>, <pad>, <s> or <unk>, which a random model otherwise would.
    """
    bos_id, eos_id, pad_id = (token_id(tokenizer, t) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN))
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        projection_dim=spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    config = make_llava_config(
        vision_config, text_config, token_id(tokenizer, IMAGE_TOKEN), spec.projector, spec.image_size
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    init_projector(model)
    model.generation_config = make_generation_config(tokenizer, EOS_TOKEN)
    processor = make_llava_processor(tokenizer, spec.image_size, spec.patch_size, CHAT_TEMPLATE)
    check_image_token_count(processor, config.image_seq_length)
    return save_llava(model, processor, out_dir)


def corpus_hash(corpus: Sequence[str]) -> str:
    """sha256 over the corpus texts, order-sensitive and unambiguous (each text length-prefixed)."""
    digest = hashlib.sha256()
    for text in corpus:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def tiny_fingerprint(
    corpus: Sequence[str], seed: int, teacher_spec: TinySpec = TEACHER_SPEC, student_spec: TinySpec = STUDENT_SPEC
) -> dict:
    """What a built pair of tiny models was built from; any change means rebuild."""
    return {
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "corpus_sha256": corpus_hash(corpus),
        "teacher": dataclasses.asdict(teacher_spec),
        "student": dataclasses.asdict(student_spec),
    }


def _read_fingerprint(root: Path) -> dict | None:
    try:
        return json.loads((root / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return None


def ensure_tiny_models(
    models_dir: str | os.PathLike,
    texts: Iterable[str],
    seed: int,
    teacher_spec: TinySpec = TEACHER_SPEC,
    student_spec: TinySpec = STUDENT_SPEC,
) -> dict[str, str]:
    """Return {"teacher": dir, "student": dir}, building both models under ``models_dir`` if needed.

    Reused when ``models_dir/tiny_llava/fingerprint.json`` matches (specs, seed,
    corpus incl. Table 6 prompts, builder version); rebuilt otherwise. The build
    happens in a temporary sibling folder that is renamed into place only when
    complete, so a killed build never leaves a half-written model that looks
    valid, and a concurrent builder's finished result is accepted as is.
    """
    if teacher_spec.vocab_size != student_spec.vocab_size:
        raise ValueError("teacher and student share one tokenizer: their vocab_size must match")
    if teacher_spec.image_size != student_spec.image_size or teacher_spec.patch_size != student_spec.patch_size:
        raise ValueError("teacher and student must see images the same way: image_size and patch_size must match")
    parent = Path(models_dir)
    root = parent / SUBDIR
    corpus = tokenizer_corpus(texts)
    fingerprint = tiny_fingerprint(corpus, seed, teacher_spec, student_spec)
    paths = {"teacher": str(root / "teacher"), "student": str(root / "student")}
    if _read_fingerprint(root) == fingerprint:
        return paths

    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{SUBDIR}.tmp-{uuid.uuid4().hex}"
    try:
        tokenizer = _train_bpe(corpus, teacher_spec.vocab_size)
        build_tiny_llava(tmp / "teacher", teacher_spec, tokenizer, seed)
        build_tiny_llava(tmp / "student", student_spec, tokenizer, seed + 1)
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
        if _read_fingerprint(root) == fingerprint:  # a concurrent builder finished first: keep its models
            return paths
        if root.exists():  # stale: move aside first, a rename cannot replace a non-empty folder
            stale = parent / f".{SUBDIR}.stale-{uuid.uuid4().hex}"
            try:
                os.rename(root, stale)
            except FileNotFoundError:  # another builder moved it already
                pass
            else:
                shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if _read_fingerprint(root) != fingerprint:  # lost a race to a different build
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
