"""Tests for mmdc/train/formatting.py: Eq. 2 layout, label masks token by token, truncation, captions, RNG.

A word-level tokenizer makes the expected token lists writable by hand; a byte-level BPE tokenizer
checks the same contract on a realistic subword vocabulary (answer spans starting mid-token).
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mmdc.train import formatting as F
from mmdc.train.formatting import IGNORE_INDEX, NoSupervisedTokens

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
N_IMG = 4  # image_seq_length used throughout (2x2 patches)
ROW = {
    "conversation_id": "img-1",
    "image_id": "img-1",
    "image": "img-1.png",
    "questions": ["what color is the square?", "how big is it?"],
    "answers": ["the square is red.", "it is small."],
    "instruction_ids": ["a", "b"],
}
WORDS = "SYS USER ASSISTANT : ? . what color is the square how big it red small a blue circle".split()


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


@pytest.fixture(scope="module")
def word_tok() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    return _wrap(tok)


@pytest.fixture(scope="module")
def bpe_tok() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["SYS USER: what color is the square? ASSISTANT: the square is red."] * 5, trainer)
    return _wrap(tok)


def _tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def _expected(position: str) -> tuple[list[str], list[bool]]:
    """Hand-written token list and supervision flags for ROW under the Vicuna v1 layout."""
    img = ["<image>"] * N_IMG
    q1 = "what color is the square ?".split()
    turn1 = img + q1 if position == "before" else q1 + img
    parts = [
        (["<s>", "SYS", "USER", ":"] + turn1 + ["ASSISTANT", ":"], False),
        ("the square is red . </s>".split(), True),
        ("USER : how big is it ? ASSISTANT :".split(), False),
        ("it is small . </s>".split(), True),
    ]
    tokens, flags = [], []
    for toks, sup in parts:
        tokens += toks
        flags += [sup] * len(toks)
    return tokens, flags


@pytest.mark.parametrize("position", ["before", "after"])
def test_two_turn_mask_token_by_token(word_tok, position):
    enc = F.encode_conversation(word_tok, ROW, position, 512, image_seq_length=N_IMG, system="SYS")
    tokens, flags = _expected(position)
    assert _tokens(word_tok, enc["input_ids"]) == tokens
    assert [label != IGNORE_INDEX for label in enc["labels"]] == flags
    # supervised labels are the input ids themselves (the model shifts internally)
    assert all(label == i for label, i in zip(enc["labels"], enc["input_ids"]) if label != IGNORE_INDEX)
    assert enc["attention_mask"] == [1] * len(tokens)


def test_bad_image_position_is_rejected(word_tok):
    with pytest.raises(ValueError, match="img-1.*image_position"):
        F.encode_conversation(word_tok, ROW, "middle", 512, image_seq_length=N_IMG)


def test_text_only_sample_has_no_image_ids_and_the_same_labels(word_tok):
    """A text-only row (ScienceQA's fine-tune) renders without <image>; its answers are supervised as usual."""
    enc = F.encode_conversation(word_tok, ROW, F.TEXT_ONLY, 512, image_seq_length=N_IMG, system="SYS")
    tokens, flags = _expected("before")
    keep = [t != "<image>" for t in tokens]
    assert _tokens(word_tok, enc["input_ids"]) == [t for t, k in zip(tokens, keep) if k]
    assert [label != IGNORE_INDEX for label in enc["labels"]] == [f for f, k in zip(flags, keep) if k]
    with pytest.raises(ValueError, match="expected no '<image>'"):  # a text-only question must not carry one
        row = {**ROW, "questions": ["<image> what color is the square?", "how big is it?"]}
        F.encode_conversation(word_tok, row, F.TEXT_ONLY, 512, image_seq_length=N_IMG)


@pytest.mark.parametrize("position", ["before", "after"])
def test_ids_equal_the_serving_chat_template(bpe_tok, position):
    """Render with the Jinja CHAT_TEMPLATE the engines use, expand <image>, tokenize: same ids."""
    from mmdc.train.templates import CHAT_TEMPLATE, to_messages

    turns = list(zip(ROW["questions"], ROW["answers"]))
    text = bpe_tok.apply_chat_template(to_messages(None, turns, position), chat_template=CHAT_TEMPLATE, tokenize=False)
    expected = bpe_tok(text.replace("<image>", "<image>" * N_IMG))["input_ids"]
    enc = F.encode_conversation(bpe_tok, ROW, position, 4096, image_seq_length=N_IMG)
    assert enc["input_ids"] == expected


def test_bpe_ids_equal_serving_tokenization_and_answers_are_supervised(bpe_tok):
    enc = F.encode_conversation(bpe_tok, ROW, "before", 512, image_seq_length=N_IMG, system="SYS")
    text = (
        "SYS USER: " + "<image>" * N_IMG + "\nwhat color is the square? ASSISTANT: the square is red.</s>"
        "USER: how big is it? ASSISTANT: it is small.</s>"
    )
    assert enc["input_ids"] == bpe_tok(text)["input_ids"]  # same ids the engine sees for this text
    runs, current = [], []
    for i, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    decoded = [bpe_tok.decode(r) for r in runs]
    assert decoded == [" the square is red.</s>", " it is small.</s>"]


def test_truncation_inside_second_answer_keeps_partial_supervision(word_tok):
    tokens, flags = _expected("before")
    cut = tokens.index("small")  # keep up to (excluding) "small"
    enc = F.encode_conversation(word_tok, ROW, "before", cut, image_seq_length=N_IMG, system="SYS")
    assert len(enc["input_ids"]) == cut
    assert _tokens(word_tok, enc["input_ids"]) == tokens[:cut]
    assert [label != IGNORE_INDEX for label in enc["labels"]] == flags[:cut]


@pytest.mark.parametrize("cut", [3, 6, 14])  # inside prefix, inside image tokens, right before answer 1
def test_truncation_without_supervision_raises_and_is_counted(word_tok, cut):
    tokens, flags = _expected("before")
    assert not any(flags[:cut])
    with pytest.raises(NoSupervisedTokens, match="img-1"):
        F.encode_conversation(word_tok, ROW, "before", cut, image_seq_length=N_IMG, system="SYS")
    other = dict(ROW, conversation_id="img-2")
    result = F.encode_rows(
        [ROW, other],
        lambda r: F.encode_conversation(
            word_tok, r, "before", cut if r["conversation_id"] == "img-1" else 512, image_seq_length=N_IMG, system="SYS"
        ),
    )
    assert result.dropped == ["img-1"]
    assert len(result.samples) == 1


def test_first_answer_token_alone_survives(word_tok):
    tokens, _ = _expected("before")
    cut = tokens.index("the", tokens.index("ASSISTANT")) + 1
    enc = F.encode_conversation(word_tok, ROW, "before", cut, image_seq_length=N_IMG, system="SYS")
    assert sum(label != IGNORE_INDEX for label in enc["labels"]) == 1


def test_malformed_rows_name_the_conversation(word_tok):
    bad = dict(ROW, answers=["only one"])
    with pytest.raises(ValueError, match="img-1.*2 questions but 1 answers"):
        F.encode_conversation(word_tok, bad, "before", 512, image_seq_length=N_IMG)
    with pytest.raises(ValueError, match="img-1.*no turns"):
        F.encode_conversation(word_tok, dict(ROW, questions=[], answers=[]), "before", 512, image_seq_length=N_IMG)
    with pytest.raises(ValueError, match="exactly one"):  # a question that still carries <image>
        F.encode_conversation(
            word_tok, dict(ROW, questions=["<image> what?", "x"]), "before", 512, image_seq_length=N_IMG
        )


def test_caption_format(word_tok):
    enc = F.encode_caption(word_tok, "a red square.", 64, image_seq_length=N_IMG, sample_id="cap-1")
    assert _tokens(word_tok, enc["input_ids"]) == ["<s>"] + ["<image>"] * N_IMG + "a red square . </s>".split()
    assert [label != IGNORE_INDEX for label in enc["labels"]] == [False] * (1 + N_IMG) + [True] * 5
    with pytest.raises(NoSupervisedTokens, match="cap-1"):
        F.encode_caption(word_tok, "a red square.", 1 + N_IMG, image_seq_length=N_IMG, sample_id="cap-1")
    with pytest.raises(ValueError, match="cap-2.*empty"):
        F.encode_caption(word_tok, "  ", 64, image_seq_length=N_IMG, sample_id="cap-2")


def test_image_position_rng_is_reproducible_and_balanced():
    ids = [f"conv-{i}" for i in range(400)]
    first = [F.choose_image_position(7, c, 0) for c in ids]
    assert first == [F.choose_image_position(7, c, 0) for c in ids]  # pure function
    assert set(first) == {"before", "after"}
    assert 150 < first.count("before") < 250
    assert first != [F.choose_image_position(7, c, 1) for c in ids]  # a new epoch re-draws
    assert first != [F.choose_image_position(8, c, 0) for c in ids]  # a new seed re-draws


def test_collate_pads_right(word_tok):
    a = F.encode_caption(word_tok, "a red square.", 64, image_seq_length=N_IMG)
    b = F.encode_caption(word_tok, "a blue circle.", 64, image_seq_length=N_IMG)
    b = {k: v[:-2] for k, v in b.items()}  # shorter
    a["pixel_values"] = torch.zeros(3, 8, 8)
    b["pixel_values"] = torch.ones(3, 8, 8)
    out = F.collate([a, b], pad_id=3)
    n = len(a["input_ids"])
    assert out["input_ids"].shape == (2, n)
    assert out["input_ids"][1, -2:].tolist() == [3, 3]
    assert out["labels"][1, -2:].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert out["attention_mask"].sum(1).tolist() == [n, n - 2]
    assert out["pixel_values"].shape == (2, 3, 8, 8)
    assert out["pixel_values"][1].eq(1).all()
    # a text-only sample has no image: pixel_values holds the others' images, in batch order
    mixed = F.collate([{k: v for k, v in a.items() if k != "pixel_values"}, b, a], pad_id=3)
    assert mixed["input_ids"].shape[0] == 3
    assert mixed["pixel_values"].shape == (2, 3, 8, 8)
    assert mixed["pixel_values"][0].eq(1).all() and mixed["pixel_values"][1].eq(0).all()
    assert "pixel_values" not in F.collate([{k: v for k, v in a.items() if k != "pixel_values"}], pad_id=3)


def test_image_seq_length_matches_llava_processor(word_tok):
    from PIL import Image
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=word_tok,
        patch_size=16,
        num_additional_image_tokens=1,
        vision_feature_select_strategy="default",
    )
    n = F.image_seq_length_of(proc)
    assert n == 4
    ids = proc(images=Image.new("RGB", (40, 40)), text="<image>", return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(word_tok.image_token_id) == n
