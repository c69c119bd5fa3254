"""Table 6 prompts, request shapes, and the referee / augmentor reply parsers."""

from __future__ import annotations

import pytest

from mmdc import roles
from mmdc.roles import RefereeParseError, Role, parse_augmentor, parse_referee

PAPER = "/work/shared/paper/mmdc-sigir24.txt"


def test_role_values_are_short_names():
    assert [r.value for r in Role] == ["teacher", "referee", "augmentor", "student"]
    assert Role("referee") is Role.REFEREE


def _paper_table6() -> dict[str, str]:
    """Table 6 rows from the paper text: {role: (system, user)} with ' \\n ' read as a newline."""
    try:
        lines = open(PAPER, encoding="utf-8").read().splitlines()
    except OSError:
        pytest.skip("paper text not available")
    start = next(i for i, line in enumerate(lines) if line.startswith("Table 6:"))
    cells = [line.split("\t")[-1] for line in lines[start + 2 : start + 8]]
    return {
        name: cell.replace(" \\n ", "\n")
        for name, cell in zip(
            ["teacher_system", "teacher_user", "referee_system", "referee_user", "augmentor_system", "augmentor_user"],
            cells,
        )
    }


def test_prompts_are_table6_verbatim():
    table = _paper_table6()
    assert roles.TEACHER_SYSTEM == table["teacher_system"]
    assert roles.TEACHER_USER == table["teacher_user"]
    assert roles.REFEREE_SYSTEM == table["referee_system"]
    assert roles.REFEREE_USER == table["referee_user"]
    assert roles.AUGMENTOR_SYSTEM == table["augmentor_system"]
    assert roles.AUGMENTOR_USER == table["augmentor_user"]


def test_prompts_keep_odd_casing_and_wording():
    assert "overall performance. avoiding any potential bias" in roles.REFEREE_USER
    assert "Please Design a Created Question" in roles.AUGMENTOR_USER
    assert "(1)The difficulty level" in roles.AUGMENTOR_USER
    assert roles.TEACHER_USER == "[Question]\n{User Question}"


def _text(messages):
    return messages[-1]["content"][1]["text"]


def test_teacher_messages_shape():
    messages = roles.teacher_messages("What is {this}?", "data:image/png;base64,AAA")
    assert messages == [
        {"role": "system", "content": roles.TEACHER_SYSTEM},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                {"type": "text", "text": "[Question]\nWhat is {this}?"},
            ],
        },
    ]


def test_student_messages_have_no_system_prompt_and_plain_question():
    messages = roles.student_messages("Why?", "u")
    assert len(messages) == 1 and messages[0]["role"] == "user"
    assert _text(messages) == "Why?"


def test_referee_messages_place_answers():
    text = _text(roles.referee_messages("Q?", "first {x}", "second", "u"))
    assert text.startswith("[Question]\nQ?\n[Assistant 1]\nfirst {x}\n[End of Assistant 1]\n[Assistant 2]\nsecond\n")
    assert "[End of Assistant 2] Please rate" in text


def test_augmentor_messages():
    messages = roles.augmentor_messages("What color?", "u")
    assert messages[0]["content"] == roles.AUGMENTOR_SYSTEM
    assert _text(messages).startswith("[Question]\nWhat color? Please Design")


def test_messages_reject_non_text():
    with pytest.raises(TypeError, match="question"):
        roles.teacher_messages(None, "u")  # type: ignore[arg-type]


def test_messages_without_images():
    stripped = roles.messages_without_images(roles.teacher_messages("Q", "data:huge"))
    assert stripped[1]["content"][0] == {"type": "image"}
    assert "data:huge" not in repr(stripped)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("The scores for Assistant 1 and 2 are 8 and 7, respectively.", (8.0, 7.0)),
        ("8 and 7", (8.0, 7.0)),
        ("8/10 and 7/10", (8.0, 7.0)),
        ("Assistant 1: 8\nAssistant 2: 7", (8.0, 7.0)),
        ("8 7", (8.0, 7.0)),
        ("8, 7\nAssistant 1 is more detailed.", (8.0, 7.0)),
        ("7.5 6", (7.5, 6.0)),
        ("The scores for Assistant 1 and 2 are 7.5 and 10, respectively.", (7.5, 10.0)),
        ("Sure! The scores for Assistant 1 and Assistant 2 are: 6/10 and 9/10. Assistant 2 counts 3 dogs.", (6.0, 9.0)),
        ("**Assistant 1**: 8\n**Assistant 2**: 7\nAssistant 1 was more detailed about the 3 dogs", (8.0, 7.0)),
        ("Assistant 1 receives a score of 8 out of 10, and Assistant 2 receives a score of 6.", (8.0, 6.0)),
        ("Assistant 2's score: 4\nAssistant 1's score: 9", (9.0, 4.0)),
        ("After careful thought I rate them 1 and 10.", (1.0, 10.0)),
        ("On a scale of 1 to 10: 6 and 9", (6.0, 9.0)),
        ("Scores between 1 and 10 -> 4, 6", (4.0, 6.0)),
        ("The scores for Assistant 1 and 2 are 8 and 7. The scores for Assistant 1 and 2 are 8 and 7.", (8.0, 7.0)),
    ],
)
def test_parse_referee_accepts(reply, expected):
    assert parse_referee(reply) == expected


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("The scores for Assistant 1 and 2 are 11 and 7, respectively.", "outside"),
        ("The scores are 0 and 5", "outside"),
        ("Assistant 1: -1\nAssistant 2: 5", "outside"),
        ("8/10 and 10.5/10", "outside"),
        ("8", "only one"),
        ("Assistant 1: 8", "only one"),
        ("Assistant 1 is better.", "no score"),
        ("", "no score"),
        ("The scores for Assistant 1 and 2 are [Assistant 1 score] and [Assistant 2 score], respectively.", "no score"),
        ("3 5 7", "ambiguous"),
        ("8 and 7. Also 3 and 4.", "ambiguous"),
        ("Assistant 1: 8\nAssistant 2: 7\nAssistant 1: 6", "ambiguous"),
        ("The scores for Assistant 1 and 2 are 8 and 7. The scores for Assistant 1 and 2 are 6 and 7.", "ambiguous"),
        ("Both did fine.\nI give 8, then 7, then 9.", "ambiguous"),
    ],
)
def test_parse_referee_rejects(reply, reason):
    with pytest.raises(RefereeParseError) as info:
        parse_referee(reply)
    assert reason in info.value.reason
    assert info.value.text == reply


def test_parse_referee_rejects_non_text():
    with pytest.raises(RefereeParseError, match="not text"):
        parse_referee(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Created Question: What color is the car?", "What color is the car?"),
        ('"What is the man holding?"', "What is the man holding?"),
        ("Sure, here is a created question:\n\nWhat is on the table?", "What is on the table?"),
        ("**Created Question:** “Why is the dog running?”", "Why is the dog running?"),
        ("[Question]\nWhat is it? Created Question: How many cats are there?", "How many cats are there?"),
        ("New question - Where is the boat?", "Where is the boat?"),
        ("Q: Where is it?", "Where is it?"),
        ("  What?  ", "What?"),
        ("Question: Where is it? Answer: park", "Where is it? Answer: park"),  # answer kept for the validity check
        ("", ""),
        ('"', ""),
    ],
)
def test_parse_augmentor(reply, expected):
    assert parse_augmentor(reply) == expected


def test_prompt_texts_lists_all_six():
    assert roles.PROMPT_TEXTS == [
        roles.TEACHER_SYSTEM,
        roles.TEACHER_USER,
        roles.REFEREE_SYSTEM,
        roles.REFEREE_USER,
        roles.AUGMENTOR_SYSTEM,
        roles.AUGMENTOR_USER,
    ]
