"""The four roles of the paper (section 3.3) as prompt layers: requests in, parsed results out.

Teacher, referee and augmentor are one model behind one engine in the paper
(LLaVA-13B); what makes them different roles is only the prompt (Table 6) and
how the reply is read. Keeping that here, as pure functions with no Ray and no
model, lets the prompts be checked word for word against the paper and the
parsers be tested on every reply shape a real model produces.

Requests are OpenAI-style chat messages (the protocol every engine backend
speaks): a system message, then one user message whose content is the image
(as a URL, usually a data URL) followed by the text.
"""

from __future__ import annotations

import enum
import hashlib
import re
from typing import Any


class Role(str, enum.Enum):
    """The paper's four roles; the value is the short name used in logs, metrics, file names and config keys."""

    TEACHER = "teacher"
    REFEREE = "referee"  # the paper's "Assessment agent" R
    AUGMENTOR = "augmentor"
    STUDENT = "student"


def row_seed(run_seed: int, role: str, instruction_id: str, attempt: int = 0, iteration: int | None = None) -> int:
    """Per-row sampling seed of a role: stable across batching, replicas and resumes.

    Without ``iteration`` it is stable across iterations too: the frozen teacher answers an instruction
    the same way every time, so its answer store holds. The augmentor passes the iteration, so an
    instruction that is still hard in a later iteration gets a fresh question (SPEC.md, phase D).
    """
    parts = [run_seed, role, instruction_id, attempt] + ([] if iteration is None else [iteration])
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()
    return int(digest[:15], 16)


# --- Table 6, verbatim. The paper's " \n " is a line break; every word and its casing is kept as printed,
# --- including the placeholders' names (filled with str.format, so braces inside a question are safe).

TEACHER_SYSTEM = (
    "You are a helpful assistant. You are able to understand the visual content that the user provides, "
    "and answer the user questions based on the image content."
)
TEACHER_USER = "[Question]\n{User Question}"

REFEREE_SYSTEM = (
    "We would like to request your feedback on the performance of two AI assistants in response to the "
    "user question displayed following. The user asks the question on observing an image."
)
REFEREE_USER = (
    "[Question]\n{User Question}\n"
    "[Assistant 1]\n{Assistant 1 Answer}\n[End of Assistant 1]\n"
    "[Assistant 2]\n{Assistant 2 Answer}\n[End of Assistant 2] "
    "Please rate the helpfulness, relevance, accuracy, level of details of their responses. "
    "Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better "
    "overall performance. avoiding any potential bias and ensuring that the order in which the responses were "
    "presented does not affect your judgment. Please output in the following format: "
    '"The scores for Assistant 1 and 2 are [Assistant 1 score] and [Assistant 2 score], respectively."'
)

AUGMENTOR_SYSTEM = (
    "We would like you to act as a Question Creator, and you are seeing a single image. "
    "Your goal is to draw inspiration from the given question."
)
AUGMENTOR_USER = (
    "[Question]\n{User Question} "
    "Please Design a Created Question between you and a person asking about this image. "
    "Please output a created question according to the following requirements: "
    "(1)The difficulty level of the Created Question must be similar to the Given Question. "
    "(2)The Created Question must be based on the content in the image. "
    "(3)The output must contain only one single sentence and do not output the answer."
)

# Every prompt text, e.g. for training a tiny tokenizer that must encode them compactly.
PROMPT_TEXTS: list[str] = [TEACHER_SYSTEM, TEACHER_USER, REFEREE_SYSTEM, REFEREE_USER, AUGMENTOR_SYSTEM, AUGMENTOR_USER]

Message = dict[str, Any]


def _user_message(text: str, image_url: str) -> Message:
    """The user turn: the image first, then the text (the order LLaVA's own prompts use)."""
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": text},
        ],
    }


def _check_text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def teacher_messages(question: str, image_url: str) -> list[Message]:
    """Chat request asking the teacher to answer ``question`` about the image (Table 6, Teacher)."""
    text = TEACHER_USER.format(**{"User Question": _check_text("question", question)})
    return [{"role": "system", "content": TEACHER_SYSTEM}, _user_message(text, _check_text("image_url", image_url))]


def student_messages(question: str, image_url: str) -> list[Message]:
    """Chat request for the student: the plain question, no system prompt (the chat template's default applies).

    The student was tuned on bare questions, so it is assessed on bare questions.
    """
    return [_user_message(_check_text("question", question), _check_text("image_url", image_url))]


def referee_messages(question: str, answer_1: str, answer_2: str, image_url: str) -> list[Message]:
    """Chat request asking the referee to score two answers (Table 6, Assessment).

    The caller decides who is Assistant 1: the assessment asks twice, once per order.
    """
    text = REFEREE_USER.format(
        **{
            "User Question": _check_text("question", question),
            "Assistant 1 Answer": _check_text("answer_1", answer_1),
            "Assistant 2 Answer": _check_text("answer_2", answer_2),
        }
    )
    return [{"role": "system", "content": REFEREE_SYSTEM}, _user_message(text, _check_text("image_url", image_url))]


def augmentor_messages(question: str, image_url: str) -> list[Message]:
    """Chat request asking the augmentor for one new question inspired by ``question`` (Table 6, Augmentor)."""
    text = AUGMENTOR_USER.format(**{"User Question": _check_text("question", question)})
    return [{"role": "system", "content": AUGMENTOR_SYSTEM}, _user_message(text, _check_text("image_url", image_url))]


def messages_without_images(messages: list[Message]) -> list[Message]:
    """Copy of ``messages`` with each image part replaced by ``{"type": "image"}``.

    Used to key the teacher's answer store: the image is identified by its
    sha256 instead of a multi-megabyte data URL.
    """
    out: list[Message] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [{"type": "image"} if part.get("type") == "image_url" else dict(part) for part in content]
        out.append({**message, "content": content})
    return out


# --- Referee replies -------------------------------------------------------------------------------------------


class RefereeParseError(ValueError):
    """A referee reply that does not yield exactly two scores in 1..10; ``reason`` says why, ``text`` is the reply."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(f"{reason}: {text[:200]!r}")
        self.reason = reason
        self.text = text

    def __reduce__(self):  # rebuilt from its fields when it crosses Ray
        return type(self), (self.reason, self.text)


SCORE_MIN, SCORE_MAX = 1.0, 10.0

# A number, possibly signed (so "-1" is rejected as out of range instead of read as 1), possibly decimal,
# not glued to a word or another number ("v2", "3.5.1"); an optional "/10" or "out of 10" is swallowed.
_NUM = r"(?<![\w.])(-?\d+(?:\.\d+)?)(?![\w]|\.\d)"
_OF_TEN = r"(?:\s*/\s*10(?![\d.])|\s+out\s+of\s+10(?![\d.]))?"
_SCORE = _NUM + _OF_TEN

# The paper's own sentence: "The scores for Assistant 1 and 2 are 8 and 7, respectively."
_SENTENCE_RE = re.compile(
    r"scores?\s+(?:for|of)\s+assistant\s*1\s*(?:and|&)\s*(?:assistant\s*)?2\s+(?:are|is|were|:)\s*:?\s*"
    + _SCORE
    + r"\s*(?:and|&|,|;)\s*"
    + _SCORE,
    re.IGNORECASE,
)
# "Assistant 1: 8", "Assistant 2's score is 7/10", "Assistant 1 receives a score of 8", "Assistant 1 (8/10)".
_LABEL_RE = re.compile(
    r"assistant\s*([12])(?![\d.])\s*(?:'s\s*)?"
    r"(?:(?:overall|final|score|rating|receives|received|gets|got|scored|scores|is|of|a|an)\b\s*)*"
    r"[:=(\-]?\s*" + _SCORE,
    re.IGNORECASE,
)
# "8 and 7", "8/10 and 7/10".
_PAIR_RE = re.compile(_SCORE + r"\s*(?:and|&)\s*" + _SCORE, re.IGNORECASE)
_ANY_SCORE_RE = re.compile(_SCORE, re.IGNORECASE)
# Text that holds digits but no score: the labels themselves and the scale ("a scale of 1 to 10", "between 1 and 10").
_NOT_SCORES_RE = re.compile(
    r"assistant\s*1\s*(?:and|&)\s*(?:assistant\s*)?2(?![\d.])"
    r"|assistant\s*[12](?![\d.])"
    r"|(?:scale|range)\s+(?:of|from)\s+1\s*(?:to|-|and)\s*10(?![\d.])"
    r"|between\s+1\s+and\s+10(?![\d.])"
    r"|from\s+1\s+to\s+10(?![\d.])",
    re.IGNORECASE,
)
_MARKUP_RE = re.compile(r"[*_#`]+")


def _in_range(value: str, text: str) -> float:
    score = float(value)
    if not SCORE_MIN <= score <= SCORE_MAX:
        raise RefereeParseError(f"score {value} outside {SCORE_MIN:g}..{SCORE_MAX:g}", text)
    return score


def _agreed(pairs: list[tuple[str, str]], what: str, text: str) -> tuple[float, float] | None:
    """The one pair all matches agree on (range-checked), None without matches; disagreeing matches are ambiguous."""
    if not pairs:
        return None
    values = {(float(a), float(b)) for a, b in pairs}
    if len(values) > 1:
        raise RefereeParseError(f"ambiguous: {len(values)} different {what} score pairs", text)
    a, b = pairs[0]
    return _in_range(a, text), _in_range(b, text)


def parse_referee(text: str) -> tuple[float, float]:
    """Read (Assistant 1 score, Assistant 2 score) from a referee reply.

    Tried in order, the first form found wins:
    1. the paper's sentence "The scores for Assistant 1 and 2 are 8 and 7, respectively." (also "8/10 and 7/10");
    2. labelled scores: "Assistant 1: 8" ... "Assistant 2: 7" (both labels needed);
    3. a bare pair anywhere: "8 and 7";
    4. exactly two numbers on the first non-empty line: "8 7", "8, 7".
    Decimals are fine. Raises RefereeParseError for a score outside 1..10, for
    matches that disagree, and for replies with no, one, or too many candidate
    numbers: a score is never guessed.
    """
    if not isinstance(text, str):
        raise RefereeParseError(f"reply is {type(text).__name__}, not text", repr(text))
    clean = _MARKUP_RE.sub("", text)

    found = _agreed([m.groups() for m in _SENTENCE_RE.finditer(clean)], "sentence", text)
    if found:
        return found

    labelled: dict[str, set[str]] = {"1": set(), "2": set()}
    for match in _LABEL_RE.finditer(clean):
        labelled[match.group(1)].add(match.group(2))
    if labelled["1"] and labelled["2"]:
        if any(len({float(v) for v in values}) > 1 for values in labelled.values()):
            raise RefereeParseError("ambiguous: an assistant is given two different scores", text)
        return _in_range(next(iter(labelled["1"])), text), _in_range(next(iter(labelled["2"])), text)

    masked = _NOT_SCORES_RE.sub(" ", clean)
    found = _agreed([m.groups() for m in _PAIR_RE.finditer(masked)], "'X and Y'", text)
    if found:
        return found

    lines = [line for line in masked.splitlines() if line.strip()]
    if lines:
        first = _ANY_SCORE_RE.findall(lines[0])
        if len(first) == 2:
            return _in_range(first[0], text), _in_range(first[1], text)

    candidates = _ANY_SCORE_RE.findall(masked)
    if not candidates:
        raise RefereeParseError("no score found", text)
    if len(candidates) == 1:
        raise RefereeParseError("only one score found", text)
    raise RefereeParseError(f"ambiguous: {len(candidates)} candidate scores", text)


# --- Augmentor replies -----------------------------------------------------------------------------------------

# "Created Question:", "New question -", "Question:", "Q:" at the start of a line (markdown already removed).
_QUESTION_LABEL_RE = re.compile(
    r"^\s*(?:(?:created|new|generated)\s+)?(?:question|q)\s*\d*\s*[:：\-–]\s*",
    re.IGNORECASE | re.MULTILINE,
)
_CREATED_LABEL_RE = re.compile(r"created\s+question\s*[:：\-–]\s*", re.IGNORECASE)
_PREAMBLE_RE = re.compile(r"^\s*(?:sure|okay|ok|certainly|here)\b[^\n]*[:!.]\s*$", re.IGNORECASE)
_QUOTES = "\"'“”‘’`«»"


def parse_augmentor(text: str) -> str:
    """The created question in an augmentor reply, or "" when there is none.

    Strips a "Created Question:" style label (the text after the last such
    label wins, so an echoed "[Question] ..." before it is dropped), a leading
    "Sure, here is ...:" line, markdown, surrounding quotes and whitespace.
    Anything else is kept as written, so an answer or a second sentence the
    model added is still there for the validity checks in mmdc.data.augment.
    """
    if not isinstance(text, str):
        raise TypeError(f"augmentor reply must be a str, got {type(text).__name__}")
    reply = _MARKUP_RE.sub("", text).replace("\r\n", "\n").strip()
    created = list(_CREATED_LABEL_RE.finditer(reply))
    if created:
        reply = reply[created[-1].end() :]
    else:
        lines = reply.split("\n")
        while lines and (not lines[0].strip() or _PREAMBLE_RE.match(lines[0])):
            lines.pop(0)
        reply = "\n".join(lines)
        if reply.lstrip().startswith("[Question]"):
            reply = reply.lstrip()[len("[Question]") :]
        labels = list(_QUESTION_LABEL_RE.finditer(reply))
        if labels:
            reply = reply[labels[-1].end() :]
    reply = reply.strip()
    while len(reply) >= 2 and reply[0] in _QUOTES and reply[-1] in _QUOTES:
        reply = reply[1:-1].strip()
    if reply and reply[0] in _QUOTES and reply.count(reply[0]) == 1:
        reply = reply[1:].strip()  # an opening quote never closed
    return reply
