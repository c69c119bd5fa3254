"""The chat template: Jinja (serving) and render_turns (training) must produce the same text."""

from __future__ import annotations

import jinja2
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from mmdc.train.templates import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM,
    STOP_TOKEN,
    Segment,
    render_messages,
    render_turns,
    to_messages,
)

QUESTIONS = ["What is in the image?", "What color is the cat's collar?", 'Why might it be "sleepy"? {x}']
ANSWERS = ["A cat on a sofa.", "It is red.\nBright red.", "It is late: the lamp is on."]


def jinja(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render with transformers' own Jinja machinery, as apply_chat_template does."""
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=CHAT_TEMPLATE, add_generation_prompt=add_generation_prompt
    )
    return rendered[0]


def test_two_turn_text_is_vicuna_v1_exactly():
    messages = to_messages(None, [("Q1?", "A1."), ("Q2?", "A2.")], image_position="before")
    assert jinja(messages) == f"{DEFAULT_SYSTEM} USER: <image>\nQ1? ASSISTANT: A1.</s>USER: Q2? ASSISTANT: A2.</s>"


def test_generation_prompt_ends_with_assistant_colon_and_image_after():
    messages = to_messages("Be brief.", [("Q1?", None)], image_position="after")
    assert jinja(messages, add_generation_prompt=True) == "Be brief. USER: Q1?\n<image> ASSISTANT:"


@pytest.mark.parametrize("n_turns", [1, 2, 3])
@pytest.mark.parametrize("image_position", ["before", "after", "none"])
@pytest.mark.parametrize("system", [None, "You are a helpful assistant.", ""])
def test_render_turns_equals_jinja(n_turns, image_position, system):
    turns = list(zip(QUESTIONS[:n_turns], ANSWERS[:n_turns]))
    segments = render_turns(system, turns, image_position)
    text = "".join(s.text for s in segments)
    assert text == jinja(to_messages(system, turns, image_position))
    assert text == render_messages(to_messages(system, turns, image_position))
    # answers, each with its leading space and stop token, are exactly the trainable segments
    assert [s.text for s in segments if s.is_answer] == [f" {a}{STOP_TOKEN}" for a in ANSWERS[:n_turns]]
    assert [s.is_answer for s in segments] == [False, True] * n_turns


@pytest.mark.parametrize("n_turns", [1, 2, 3])
@pytest.mark.parametrize("image_position", ["before", "after"])
def test_generation_prompt_equals_jinja(n_turns, image_position):
    turns = list(zip(QUESTIONS[:n_turns], ANSWERS[: n_turns - 1] + [None]))
    segments = render_turns(None, turns, image_position, add_generation_prompt=True)
    text = "".join(s.text for s in segments)
    assert text == jinja(to_messages(None, turns, image_position), add_generation_prompt=True)
    assert text.endswith(f"USER: {QUESTIONS[n_turns - 1]} ASSISTANT:") or n_turns == 1
    assert not segments[-1].is_answer and segments[-1].text.endswith(" ASSISTANT:")


def test_image_only_in_first_turn_and_system_empty():
    segments = render_turns("", [("Q1", "A1"), ("Q2", "A2")], image_position="after")
    assert segments == [
        Segment("USER: Q1\n<image> ASSISTANT:", False),
        Segment(" A1</s>", True),
        Segment("USER: Q2 ASSISTANT:", False),
        Segment(" A2</s>", True),
    ]


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            [{"type": "image_url", "image_url": {"url": "data:image/png;base64,xx"}}, {"type": "text", "text": "Hi"}],
            "<image>\nHi",
        ),
        ([{"type": "text", "text": "Hi"}, {"type": "image", "url": "x.png"}], "Hi\n<image>"),
        ([{"type": "image"}], "<image>"),
        ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "ab"),
        ("<image>\nalready inline", "<image>\nalready inline"),
    ],
)
def test_content_parts_render_the_same_in_both(content, expected):
    messages = [{"role": "user", "content": content}]
    want = f"{DEFAULT_SYSTEM} USER: {expected} ASSISTANT:"
    assert jinja(messages, add_generation_prompt=True) == want
    assert render_messages(messages, add_generation_prompt=True) == want


def test_system_as_parts_and_assistant_as_parts():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Sys."}]},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
    ]
    assert jinja(messages) == render_messages(messages) == "Sys. USER: Q ASSISTANT: A</s>"


@pytest.mark.parametrize(
    "messages, add_generation_prompt",
    [
        ([{"role": "assistant", "content": "A"}], False),  # must start with user
        ([{"role": "user", "content": "Q"}, {"role": "user", "content": "Q"}], False),  # must alternate
        ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], True),  # gen prompt after answer
        ([{"role": "user", "content": [{"type": "audio"}]}], True),  # unknown part type
        ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": [{"type": "image"}]}], False),
    ],
)
def test_bad_conversations_fail_in_both(messages, add_generation_prompt):
    with pytest.raises(jinja2.exceptions.TemplateError):
        jinja(messages, add_generation_prompt)
    with pytest.raises(ValueError):
        render_messages(messages, add_generation_prompt)


def test_render_turns_rejects_misuse():
    with pytest.raises(ValueError, match="at least one turn"):
        render_turns(None, [])
    with pytest.raises(ValueError, match="only the last turn"):
        render_turns(None, [("Q1", None), ("Q2", None)], add_generation_prompt=True)
    with pytest.raises(ValueError, match="add_generation_prompt=True"):
        render_turns(None, [("Q1", None)])
    with pytest.raises(ValueError, match="answer to be None"):
        render_turns(None, [("Q1", "A1")], add_generation_prompt=True)
    with pytest.raises(ValueError, match="image_position"):
        render_turns(None, [("Q1", "A1")], image_position="middle")
    with pytest.raises(TypeError, match="turn 1: answer"):
        render_turns(None, [("Q1", "A1"), ("Q2", 3)])
