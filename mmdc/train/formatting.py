"""Turn conversations (paper Eq. 1/2) and caption pairs into student training inputs with label masks.

Why this module exists: the student must learn to answer *and to stop* (paper 3.1, Figure 3), and
only from the answers. So every sample becomes ``input_ids`` plus ``labels`` where every position
is ``-100`` except the answer tokens and the stop token that closes each answer.

Three things here are easy to get subtly wrong, and each has a test:

- **Layout equals serving.** The text is rendered by the same template code the serving chat
  template uses (``mmdc.train.templates.render_turns``), then tokenized *as one string*, exactly as
  the engines tokenize the prompt. Labels come from character offsets (which tokens overlap an
  answer span), not from tokenizing segments separately, so ``input_ids`` are the serving ids.
- **Image position (Eq. 2).** At turn 1 the image token goes before or after the first question,
  chosen per sample by :func:`choose_image_position` from ``(run seed, conversation_id, epoch)``:
  reproducible, and independent of which worker or shard sees the row.
- **Truncation is never silent.** A sample cut to ``max_length`` that keeps no supervised token
  raises :class:`NoSupervisedTokens`; :func:`encode_rows` drops and counts such samples so the
  trainer reports them.

The single ``<image>`` placeholder is expanded to ``image_seq_length`` copies before tokenization,
the way ``LlavaProcessor`` does, so the ids line up with the model's image features.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmdc.train.templates import IMAGE_TOKEN, STOP_TOKEN, render_turns

IGNORE_INDEX = -100  # label value the loss ignores (torch CrossEntropyLoss default)
IMAGE_POSITIONS = ("before", "after")
TEXT_ONLY = "none"  # the image position of a sample without an image (a text-only ScienceQA question)


class NoSupervisedTokens(ValueError):
    """A sample that keeps no supervised token after truncation (it would train on nothing)."""

    def __init__(self, sample_id: str, length: int, max_length: int) -> None:
        super().__init__(
            f"sample {sample_id!r}: no answer token survives truncation to max_length={max_length} "
            f"(untruncated length {length}); dropped"
        )
        self.sample_id, self.length, self.max_length = sample_id, length, max_length

    def __reduce__(self):  # rebuilt from its fields when it crosses Ray
        return type(self), (self.sample_id, self.length, self.max_length)


# --------------------------------------------------------------------------------------------
# Image position (Eq. 2)
# --------------------------------------------------------------------------------------------


def choose_image_position(seed: int, conversation_id: str, epoch: int) -> str:
    """``"before"`` or ``"after"`` for this sample in this epoch, a pure function of its arguments.

    Hash-derived (sha256, not Python's salted ``hash``) so every worker, shard and rerun agrees.
    """
    digest = hashlib.sha256(f"{seed}:{conversation_id}:{epoch}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return IMAGE_POSITIONS[rng.randrange(2)]


# --------------------------------------------------------------------------------------------
# Tokenization with offset-based labels
# --------------------------------------------------------------------------------------------


def _image_token(tokenizer: Any) -> str:
    token = getattr(tokenizer, "image_token", None)
    return token if isinstance(token, str) and token else "<image>"


def _single_token_id(tokenizer: Any, token: str, what: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or ids[0] is None or (unk is not None and ids[0] == unk and token != tokenizer.unk_token):
        raise ValueError(f"the tokenizer has no single token for the {what} {token!r}; add it as a special token")
    return int(ids[0])


def _encode_segments(
    tokenizer: Any,
    segments: list[tuple[str, bool]],
    image_token: str,
    image_seq_length: int,
    max_length: int,
    sample_id: str,
    images: int = 1,
) -> dict[str, list[int]]:
    """Tokenize the joined segments once; label tokens overlapping an answer span; truncate; check.

    ``images``: placeholders the text must hold (1, or 0 for a text-only sample).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("encode_* needs a fast (tokenizers-backed) tokenizer: labels come from offset mappings")
    if image_seq_length < 1:
        raise ValueError(f"image_seq_length must be >= 1, got {image_seq_length}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    image_id = _single_token_id(tokenizer, image_token, "image token")
    expanded = image_token * image_seq_length  # what LlavaProcessor substitutes for one <image>

    text_parts: list[str] = []
    answer_spans: list[tuple[int, int]] = []  # [start, end) character spans of answers + stop tokens
    cursor = 0
    placeholders = 0
    for text, is_answer in segments:
        placeholders += text.count(image_token)
        if is_answer and image_token in text:
            raise ValueError(f"sample {sample_id!r}: an answer contains the image token {image_token!r}")
        text = text.replace(image_token, expanded)
        if is_answer:
            answer_spans.append((cursor, cursor + len(text)))
        text_parts.append(text)
        cursor += len(text)
    if placeholders != images:
        raise ValueError(
            f"sample {sample_id!r}: expected {'exactly one' if images else 'no'} {image_token!r} in the text, "
            f"found {placeholders}"
        )
    full = "".join(text_parts)

    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and full.startswith(bos))  # a template that writes BOS itself must not get two
    enc = tokenizer(full, add_special_tokens=add_special, return_offsets_mapping=True)
    input_ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    if sum(1 for i in input_ids if i == image_id) != image_seq_length * images:
        raise ValueError(
            f"sample {sample_id!r}: the tokenizer did not keep {image_token!r} as one token per copy "
            f"(expected {image_seq_length * images} image ids)"
        )

    labels = [IGNORE_INDEX] * len(input_ids)
    for k, (start, end) in enumerate(offsets):
        if end <= start:  # special tokens added by the tokenizer (BOS) have empty spans
            continue
        if any(start < a_end and end > a_start for a_start, a_end in answer_spans):
            labels[k] = input_ids[k]

    length = len(input_ids)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise NoSupervisedTokens(sample_id, length, max_length)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def _check_conversation(row: dict) -> tuple[str, list[str], list[str]]:
    sample_id = str(row.get("conversation_id", row.get("image_id", "?")))
    for key in ("questions", "answers"):
        if key not in row:
            raise ValueError(f"conversation {sample_id!r}: missing key {key!r}")
    questions, answers = list(row["questions"]), list(row["answers"])
    if not questions:
        raise ValueError(f"conversation {sample_id!r}: no turns")
    if len(questions) != len(answers):
        raise ValueError(f"conversation {sample_id!r}: {len(questions)} questions but {len(answers)} answers")
    for t, (q, a) in enumerate(zip(questions, answers)):
        if not isinstance(q, str) or not isinstance(a, str):
            raise ValueError(f"conversation {sample_id!r}, turn {t}: questions and answers must be str")
    return sample_id, questions, answers


def encode_conversation(
    tokenizer: Any,
    row: dict,
    image_position: str,
    max_length: int,
    *,
    image_seq_length: int,
    system: str | None = None,
) -> dict[str, list[int]]:
    """Eq. 2 formatting of one conversation row into ``input_ids``, ``labels``, ``attention_mask``.

    ``row`` has ``conversation_id``, ``questions`` and ``answers`` (parallel lists, turn t at index
    t). The image token is placed before or after the first question (``image_position``) and
    expanded to ``image_seq_length`` ids; ``image_position`` ``"none"`` (``TEXT_ONLY``) renders a
    text-only sample, without any image token. Labels are ``-100`` except on answer tokens and the stop
    token after each answer. Right-truncates to ``max_length``; raises :class:`NoSupervisedTokens`
    when nothing supervised is left, ``ValueError`` naming the conversation on malformed rows.
    """
    sample_id, questions, answers = _check_conversation(row)
    if image_position not in (*IMAGE_POSITIONS, TEXT_ONLY):
        raise ValueError(
            f"conversation {sample_id!r}: image_position must be one of {(*IMAGE_POSITIONS, TEXT_ONLY)}, "
            f"got {image_position!r}"
        )
    turns = [(q.strip(), a.strip()) for q, a in zip(questions, answers)]
    # system None -> the template's DEFAULT_SYSTEM, exactly as serving renders it
    segments = [(s.text, s.is_answer) for s in render_turns(system, turns, image_position)]
    image_token = _image_token(tokenizer)
    if image_token != IMAGE_TOKEN:
        raise ValueError(f"the tokenizer's image token {image_token!r} differs from the template's {IMAGE_TOKEN!r}")
    images = 0 if image_position == TEXT_ONLY else 1
    return _encode_segments(tokenizer, segments, image_token, image_seq_length, max_length, sample_id, images)


def encode_caption(
    tokenizer: Any,
    caption: str,
    max_length: int,
    *,
    image_seq_length: int,
    sample_id: str = "?",
) -> dict[str, list[int]]:
    """Stage-1 plain format: ``<image>\\n{caption}</s>``, loss on the caption and its stop token only."""
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption pair {sample_id!r}: empty caption")
    image_token = _image_token(tokenizer)
    segments = [(f"{image_token}\n", False), (f"{caption.strip()}{STOP_TOKEN}", True)]
    return _encode_segments(tokenizer, segments, image_token, image_seq_length, max_length, sample_id)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class EncodedRows:
    """Encoded samples of one batch plus the ids of samples dropped for having no supervision."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def encode_rows(
    rows: Iterable[dict],
    encode: Callable[[dict], dict[str, Any]],
) -> EncodedRows:
    """Apply ``encode`` to each row, dropping (and recording) rows that raise NoSupervisedTokens.

    Any other error propagates: a malformed row is a bug to fix, not a sample to skip.
    """
    out = EncodedRows()
    for row in rows:
        try:
            out.samples.append(encode(row))
        except NoSupervisedTokens as err:
            out.dropped.append(err.sample_id)
    return out


def image_seq_length_of(processor: Any) -> int:
    """How many ids one ``<image>`` expands to for this LLaVA processor (patches + extra - CLS drop).

    Mirrors ``LlavaProcessor``: ``(H // patch) * (W // patch) + num_additional_image_tokens``, minus
    one when ``vision_feature_select_strategy == "default"`` (the CLS feature is dropped).
    """
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) or {}
    size = getattr(ip, "size", None) or {}
    height = crop.get("height") or size.get("height") or size.get("shortest_edge")
    width = crop.get("width") or size.get("width") or size.get("shortest_edge")
    patch = getattr(processor, "patch_size", None)
    if not height or not width or not patch:
        raise ValueError("cannot derive image_seq_length: processor lacks image size or patch_size")
    n = (int(height) // int(patch)) * (int(width) // int(patch)) + int(
        getattr(processor, "num_additional_image_tokens", 0) or 0
    )
    if getattr(processor, "vision_feature_select_strategy", "default") == "default":
        n -= 1
    return n


def collate(batch: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded samples into tensors; stack ``pixel_values`` of the samples that have them.

    Each sample has ``input_ids``/``labels``/``attention_mask`` lists and optionally ``pixel_values``
    (``[3, H, W]`` from the processor's image processor; none for a text-only sample). Padding: ids
    ``pad_id``, labels ``-100``, mask ``0``. ``pixel_values`` holds one image per sample that has one, in
    batch order: the order of the image tokens in ``input_ids``, which is how LLaVA fills them in.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    longest = max(len(s["input_ids"]) for s in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)  # [batch, seq]
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)  # [batch, seq]
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)  # [batch, seq]
    for b, sample in enumerate(batch):
        n = len(sample["input_ids"])
        if len(sample["labels"]) != n or len(sample["attention_mask"]) != n:
            raise ValueError(f"collate: sample {b} has input_ids/labels/attention_mask of different lengths")
        input_ids[b, :n] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
        attention_mask[b, :n] = torch.as_tensor(sample["attention_mask"], dtype=torch.long)
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    pixels = [torch.as_tensor(s["pixel_values"]) for s in batch if "pixel_values" in s]
    if pixels:
        out["pixel_values"] = torch.stack(pixels)  # [samples with an image, 3, H, W]
    return out


def pixel_values(image_processor: Any, images: Sequence[Any]) -> torch.Tensor:
    """Preprocess PIL images with the processor's image processor: ``[n, 3, H, W]`` float tensor."""
    return image_processor(images=list(images), return_tensors="pt")["pixel_values"]
