"""The one conversation template of mmdc: Vicuna v1, as LLaVA uses it for Vicuna.

Serving and training must see exactly the same text, or the student is trained
on one format and asked questions in another. This module therefore holds the
template twice, in the two forms its two consumers need, and the tests check
that they agree character for character:

- ``CHAT_TEMPLATE``: a Jinja string for Hugging Face ``apply_chat_template``.
  It is saved with every tokenizer/processor we build, so every serving backend
  (transformers, vLLM) renders requests the same way.
- ``render_turns``: a Python renderer for the training formatter. It returns the
  same text split into prompt segments and answer segments, so label masks can
  be built (loss only on answers and their stop token, paper Eq. 2-3).

The rendered text is::

    {system} USER: {user_1} ASSISTANT: {answer_1}</s>USER: {user_2} ASSISTANT: {answer_2}</s>

with ``add_generation_prompt`` ending the text in ``" ASSISTANT:"``. The model
then generates ``" {answer}</s>"``; this is why an answer *segment* starts with
the space after ``ASSISTANT:`` and ends with the stop token. The template holds
no BOS: tokenizers add it themselves (``add_special_tokens=True``), as Llama
tokenizers do, and ``transformers`` processors do so when tokenizing a prompt.

An image is the literal token ``<image>`` (the processor expands it to one
placeholder per image patch). Where it stands is paper Eq. 2: before the first
question (``"<image>\\n" + question``) or after it (``question + "\\n<image>"``).
Message content may be a string or a list of OpenAI-style parts
``{"type": "text", "text": ...}``, ``{"type": "image"}``, ``{"type": "image_url", ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

IMAGE_TOKEN = "<image>"
STOP_TOKEN = "</s>"
DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
IMAGE_PART_TYPES = ("image", "image_url")

ImagePosition = Literal["before", "after", "none"]

# Jinja form. Rules, mirrored by `render_messages` below:
# - an optional first system message replaces DEFAULT_SYSTEM; the system text is
#   followed by one space unless it is empty;
# - then user / assistant messages alternate, starting with user;
# - user: "USER: " + content + " "; assistant: "ASSISTANT: " + content + "</s>";
# - add_generation_prompt (after a user message): "ASSISTANT:";
# - an image part renders "<image>\n" when a text part follows it, "\n<image>" when
#   only text parts precede it, and "<image>" when the content has no text at all.
CHAT_TEMPLATE = (
    "{%- macro render_content(content, role) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is none -%}{{- raise_exception(role ~ ' message has no content') -}}"
    "{%- else -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}"
    "{%- if role != 'user' -%}{{- raise_exception('image parts are only allowed in user messages') -}}"
    "{%- elif content[loop.index0 + 1:] | selectattr('type', 'equalto', 'text') | list | length > 0 -%}"
    "{{- '" + IMAGE_TOKEN + "\\n' -}}"
    "{%- elif content[:loop.index0] | selectattr('type', 'equalto', 'text') | list | length > 0 -%}"
    "{{- '\\n" + IMAGE_TOKEN + "' -}}"
    "{%- else -%}{{- '" + IMAGE_TOKEN + "' -}}"
    "{%- endif -%}"
    "{%- else -%}{{- raise_exception('unsupported content part type: ' ~ part['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages | length > 0 and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = render_content(messages[0]['content'], 'system') -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_text = '" + DEFAULT_SYSTEM.replace("'", "\\'") + "' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- if system_text | length > 0 -%}{{- system_text ~ ' ' -}}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}"
    "{%- if message['role'] != expected -%}"
    "{{- raise_exception('message ' ~ loop.index0 ~ ' after the system message has role ' ~ message['role']"
    " ~ ', expected ' ~ expected ~ ' (user and assistant must alternate, starting with user)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '" + USER_ROLE + ": ' ~ render_content(message['content'], 'user') ~ ' ' -}}"
    "{%- else -%}"
    "{{- '" + ASSISTANT_ROLE + ": ' ~ render_content(message['content'], 'assistant') ~ '" + STOP_TOKEN + "' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if loop_messages | length % 2 == 0 -%}"
    "{{- raise_exception('add_generation_prompt needs the conversation to end with a user message') -}}"
    "{%- endif -%}"
    "{{- '" + ASSISTANT_ROLE + ":' -}}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class Segment:
    """A piece of rendered conversation text.

    ``is_answer`` marks text the student is trained to produce (an answer with its
    leading space and trailing stop token); everything else is prompt, masked out
    of the loss. Joining all segments' text gives exactly the Jinja rendering.
    """

    text: str
    is_answer: bool


def _image_text(question: str, image_position: ImagePosition) -> str:
    """Place the image token around the first question (paper Eq. 2)."""
    if image_position == "before":
        return f"{IMAGE_TOKEN}\n{question}"
    if image_position == "after":
        return f"{question}\n{IMAGE_TOKEN}"
    if image_position == "none":
        return question
    raise ValueError(f"image_position must be 'before', 'after' or 'none', got {image_position!r}")


def render_turns(
    system: str | None,
    turns: Sequence[tuple[str, str | None]],
    image_position: ImagePosition = "before",
    add_generation_prompt: bool = False,
) -> list[Segment]:
    """Render (question, answer) turns as prompt and answer segments.

    ``system`` None means DEFAULT_SYSTEM. The image goes with the first question,
    at ``image_position``. The last turn's answer may be None: its prompt then ends
    in ``"ASSISTANT:"`` (a generation prompt) and ``add_generation_prompt`` must be
    True, which keeps the call honest about what it renders. The joined text equals
    ``CHAT_TEMPLATE`` applied to ``to_messages(system, turns, image_position)``.
    """
    if not turns:
        raise ValueError("render_turns needs at least one turn")
    system_text = DEFAULT_SYSTEM if system is None else system
    segments: list[Segment] = []
    prompt = f"{system_text} " if system_text else ""
    for index, (question, answer) in enumerate(turns):
        if not isinstance(question, str):
            raise TypeError(f"turn {index}: question must be a str, got {type(question).__name__}")
        user_text = _image_text(question, image_position) if index == 0 else question
        prompt += f"{USER_ROLE}: {user_text} {ASSISTANT_ROLE}:"
        if answer is None:
            if index != len(turns) - 1:
                raise ValueError(f"turn {index}: only the last turn may have no answer")
            if not add_generation_prompt:
                raise ValueError("the last turn has no answer: pass add_generation_prompt=True")
            segments.append(Segment(prompt, is_answer=False))
            return segments
        if not isinstance(answer, str):
            raise TypeError(f"turn {index}: answer must be a str or None, got {type(answer).__name__}")
        segments.append(Segment(prompt, is_answer=False))
        segments.append(Segment(f" {answer}{STOP_TOKEN}", is_answer=True))
        prompt = ""
    if add_generation_prompt:
        raise ValueError("add_generation_prompt=True needs the last turn's answer to be None")
    return segments


def to_messages(
    system: str | None,
    turns: Sequence[tuple[str, str | None]],
    image_position: ImagePosition = "before",
) -> list[dict[str, Any]]:
    """Build OpenAI-style chat messages for the same conversation ``render_turns`` renders.

    The image is an ``{"type": "image"}`` part placed before or after the first
    question's text part. A final None answer is left out (the caller adds the
    generation prompt).
    """
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    for index, (question, answer) in enumerate(turns):
        text_part = {"type": "text", "text": question}
        if index == 0 and image_position == "before":
            content: Any = [{"type": "image"}, text_part]
        elif index == 0 and image_position == "after":
            content = [text_part, {"type": "image"}]
        elif index == 0 and image_position != "none":
            raise ValueError(f"image_position must be 'before', 'after' or 'none', got {image_position!r}")
        else:
            content = question
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def _render_content(content: Any, role: str, where: str) -> str:
    """Python mirror of the template's ``render_content`` macro."""
    if isinstance(content, str):
        return content
    if content is None:
        raise ValueError(f"{where}: {role} message has no content")
    parts = list(content)
    out = []
    for index, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            out.append(part["text"])
        elif kind in IMAGE_PART_TYPES:
            if role != "user":
                raise ValueError(f"{where}: image parts are only allowed in user messages")
            if any(p.get("type") == "text" for p in parts[index + 1 :]):
                out.append(f"{IMAGE_TOKEN}\n")
            elif any(p.get("type") == "text" for p in parts[:index]):
                out.append(f"\n{IMAGE_TOKEN}")
            else:
                out.append(IMAGE_TOKEN)
        else:
            raise ValueError(f"{where}: unsupported content part type: {kind!r}")
    return "".join(out)


def render_messages(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
    """Render chat messages exactly as ``CHAT_TEMPLATE`` does, without Jinja.

    For callers that hold messages rather than turns (engines, tests); errors name
    the offending message.
    """
    loop_messages = list(messages)
    system_text = DEFAULT_SYSTEM
    if loop_messages and loop_messages[0].get("role") == "system":
        system_text = _render_content(loop_messages[0].get("content"), "system", "message 0")
        loop_messages = loop_messages[1:]
    text = f"{system_text} " if system_text else ""
    for index, message in enumerate(loop_messages):
        expected = "user" if index % 2 == 0 else "assistant"
        role = message.get("role")
        if role != expected:
            raise ValueError(
                f"message {index} after the system message has role {role!r}, expected {expected!r} "
                "(user and assistant must alternate, starting with user)"
            )
        content = _render_content(message.get("content"), role, f"message {index}")
        if role == "user":
            text += f"{USER_ROLE}: {content} "
        else:
            text += f"{ASSISTANT_ROLE}: {content}{STOP_TOKEN}"
    if add_generation_prompt:
        if len(loop_messages) % 2 == 0:
            raise ValueError("add_generation_prompt needs the conversation to end with a user message")
        text += f"{ASSISTANT_ROLE}:"
    return text
