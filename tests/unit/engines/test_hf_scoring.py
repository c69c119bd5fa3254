"""The hf engine's score requests (``score_reply``): the likelihood referee's one forward pass, without Ray."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmdc import roles
from mmdc.data.images import to_data_url
from mmdc.engines.hf import HFGenerator, _to_hf_messages


@pytest.fixture(scope="module")
def generator() -> HFGenerator:
    from mmdc.world.scenes import world_corpus
    from mmdc.world.tiny import ensure_tiny_models

    torch.set_num_threads(1)
    from mmdc.world.models import models_dir

    return HFGenerator(ensure_tiny_models(models_dir(), world_corpus(), seed=0)["student"], max_batch_size=4)


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("images")
    out = []
    for k, colour in enumerate([(200, 10, 10), (10, 10, 200)]):
        Image.new("RGB", (64, 64), colour).save(root / f"{k}.png")
        out.append(to_data_url(str(root / f"{k}.png")))
    return out


def reference_logprob(gen: HFGenerator, messages: list[dict], reply: str) -> tuple[float, int]:
    """Independently: render prompt + reply with the chat template, one unbatched forward, sum the reply's tokens."""
    msgs, images = _to_hf_messages(messages)
    prompt = gen.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = gen.processor.apply_chat_template(
        msgs + [{"role": "assistant", "content": [{"type": "text", "text": reply}]}], tokenize=False
    )
    enc_prompt = gen.processor(text=[prompt], images=images, return_tensors="pt")
    enc_full = gen.processor(text=[full], images=images, return_tensors="pt")
    start = enc_prompt["input_ids"].shape[1]
    ids = enc_full["input_ids"][0]
    assert ids[:start].tolist() == enc_prompt["input_ids"][0].tolist()  # the reply's tokens follow the prompt's
    with torch.inference_mode():
        logits = gen.model(**enc_full).logits[0]
    logp = torch.log_softmax(logits[start - 1 : -1].float(), -1)
    return float(logp.gather(-1, ids[start:].unsqueeze(-1)).sum()), len(ids) - start


def test_score_requests_match_a_teacher_forced_forward_pass_whatever_the_batch(generator, urls):
    rows = [
        (roles.teacher_messages("What color is the circle?", urls[0]), "The circle is red."),
        (
            roles.teacher_messages("Give a short description of the scene.", urls[1]),
            "A large blue square on a white background, next to nothing else at all.",
        ),
        (roles.teacher_messages("Is there a circle?", urls[0]), "Yes."),
    ]
    alone = [generator.generate([{"messages": m, "score_reply": r}])[0] for m, r in rows]
    together = generator.generate([{"messages": m, "score_reply": r} for m, r in rows])  # lengths differ: padding
    for (messages, reply), one, batched in zip(rows, alone, together):
        expected, n = reference_logprob(generator, messages, reply)
        assert batched["scored_tokens"] == one["scored_tokens"] == n > 1  # the stop token is scored too
        assert batched["logprob"] == pytest.approx(expected, abs=1e-4)
        assert one["logprob"] == pytest.approx(expected, abs=1e-4)
        assert batched["logprob"] < 0 and batched["text"] == "" and batched["finish_reason"] == "score"


def test_score_and_generate_requests_share_a_call_and_keep_their_order(generator, urls):
    ask = {
        "messages": roles.teacher_messages("What color is the circle?", urls[0]),
        "temperature": 0.0,
        "max_new_tokens": 4,
        "seed": 1,
    }
    score = {"messages": roles.teacher_messages("What color is the circle?", urls[0]), "score_reply": "Red."}
    out = generator.generate([ask, score, ask])
    assert [o["finish_reason"] == "score" for o in out] == [False, True, False]
    assert out[0]["text"] == out[2]["text"] == generator.generate([ask])[0]["text"]
    assert out[1]["logprob"] == pytest.approx(generator.generate([score])[0]["logprob"], abs=1e-4)


def test_a_reply_that_is_not_text_is_refused(generator, urls):
    with pytest.raises(ValueError, match="score_reply must be text"):
        generator.generate([{"messages": roles.teacher_messages("Why?", urls[0]), "score_reply": None}])
