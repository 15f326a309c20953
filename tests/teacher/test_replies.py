"""Strict parsing and filtering of teacher replies: every accepted shape and every rejection reason."""

from __future__ import annotations

import pytest

from llava_lit.teacher.replies import RejectedReply, parse_reply

CONV = "Question:\nWhat is red?\n===\nAnswer:\nThe circle is red.\n===\nQuestion:\nHow many?\n===\nAnswer:\nTwo.\n==="


def test_conversation_pairs():
    assert parse_reply("conversation", CONV) == [
        ("What is red?", "The circle is red."),
        ("How many?", "Two."),
    ]


def test_conversation_tolerates_same_line_prefix_missing_final_separator_and_crlf():
    text = "Question: What is red?\r\n===\r\nAnswer: The circle.\r\n"
    assert parse_reply("conversation", text) == [("What is red?", "The circle.")]


def test_complex_reasoning_exactly_one_pair():
    assert parse_reply("complex_reasoning", "Question:\nWhy?\n===\nAnswer:\nBecause it rains.") == [
        ("Why?", "Because it rains.")
    ]
    with pytest.raises(RejectedReply) as err:
        parse_reply("complex_reasoning", CONV)
    assert err.value.reason == "bad_format"


def test_detail_is_prose():
    assert parse_reply("detail_description", "  A red circle sits left of a blue square.  ") == [
        ("", "A red circle sits left of a blue square.")
    ]


@pytest.mark.parametrize(
    "data_type,text,reason",
    [
        ("conversation", "", "empty"),
        ("conversation", "   \n  ", "empty"),
        ("conversation", "The image shows a red circle.", "bad_format"),
        ("conversation", "Question:\nWhat?\n===\nQuestion:\nWhy?\n===", "bad_format"),
        ("conversation", "Question:\nWhat?\n===\nAnswer:\n\n===", "empty"),
        ("conversation", "Question:\nWhat?\n===\n===\nAnswer:\nYes.", "bad_format"),
        (
            "conversation",
            "Question:\nWhat?\n===\nAnswer:\nIt is red.\nQuestion: Why?\nAnswer: So.",
            "bad_format",
        ),
        (
            "conversation",
            "Question:\nWhat?\n===\nAnswer:\nA circle at [0.12, 0.40, 0.3, 0.5].",
            "mentions_coordinates",
        ),
        (
            "conversation",
            "Question:\nWhere?\n===\nAnswer:\nIts left edge is at 0.125.",
            "mentions_coordinates",
        ),
        ("conversation", "Question:\nWhat?\n===\nAnswer:\nAs the Captions say, a circle.", "mentions_inputs"),
        ("detail_description", "According to the description, a circle.", "mentions_inputs"),
        ("detail_description", "Question:\nWhat?\n===\nAnswer:\nA circle.", "bad_format"),
        ("complex_reasoning", "Question:\nWhy?\n===\nAnswer:\nThe bounding box shows it.", "mentions_inputs"),
    ],
)
def test_rejections(data_type, text, reason):
    with pytest.raises(RejectedReply) as err:
        parse_reply(data_type, text)
    assert err.value.reason == reason


def test_truncated_reply_is_rejected_even_if_it_parses():
    with pytest.raises(RejectedReply) as err:
        parse_reply("detail_description", "A red circle sits", finish_reason="length")
    assert err.value.reason == "truncated"


def test_plain_numbers_are_not_coordinates():
    assert parse_reply("detail_description", "There are 3 circles, about 2.5 times larger than the square.")


def test_custom_banned_words():
    with pytest.raises(RejectedReply):
        parse_reply("detail_description", "A picture of a circle.", banned_words=["picture"])
    assert parse_reply("detail_description", "A caption-free circle.", banned_words=[])
