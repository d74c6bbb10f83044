"""Step splitting of meta chains (`dreamprm.data.steps`) on realistic chains of thought.

Rule under test: prefix i is the text up to the start of step i+1; the last prefix runs up to
"Final answer" (or to the end); the question before "Step 1" belongs to every prefix.
"""
from __future__ import annotations

import doctest

import pytest

from dreamprm.data import steps
from dreamprm.data.steps import final_answer, split_step_prefixes, step_marker_positions

QUESTION = "How many red shapes are in the image?\nAnswer with a number."


def test_docstring_example():
    result = doctest.testmod(steps, verbose=False)
    assert result.attempted >= 1 and result.failed == 0


def test_colon_markers_with_final_answer():
    text = (f"{QUESTION}\n\nStep 1: I see one red circle at the top left.\n"
            "Step 2: I see two red squares.\nStep 3: So 1 + 2 = 3.\nFinal answer: 3")
    assert split_step_prefixes(text) == [
        f"{QUESTION}\n\nStep 1: I see one red circle at the top left.",
        f"{QUESTION}\n\nStep 1: I see one red circle at the top left.\nStep 2: I see two red squares.",
        f"{QUESTION}\n\nStep 1: I see one red circle at the top left.\nStep 2: I see two red squares.\n"
        "Step 3: So 1 + 2 = 3.",
    ]


def test_without_final_answer_last_prefix_is_whole_text():
    text = f"{QUESTION}\n\nStep 1: one circle.\nStep 2: so 1.\n"
    prefixes = split_step_prefixes(text)
    assert prefixes == [f"{QUESTION}\n\nStep 1: one circle.", text.rstrip()]


@pytest.mark.parametrize("marker", ["Step {n}:", "Step {n}.", "**Step {n}:**", "**Step {n}**:", "step {n}:",
                                    "STEP {n}:", "Step {n} -", "Step {n})", "Step{n}:"],
                         ids=["colon", "period", "bold-colon-inside", "bold-colon-outside", "lower-case",
                              "upper-case", "dash", "paren", "no-space"])
def test_marker_styles(marker):
    s1, s2 = marker.format(n=1), marker.format(n=2)
    text = f"{QUESTION}\n\n{s1} count circles: 1.\n{s2} count squares: 2.\nFinal answer: 3"
    assert split_step_prefixes(text) == [
        f"{QUESTION}\n\n{s1} count circles: 1.",
        f"{QUESTION}\n\n{s1} count circles: 1.\n{s2} count squares: 2.",
    ]


@pytest.mark.parametrize("final", ["Final answer: 3", "Final Answer: 3", "FINAL ANSWER: 3", "**Final answer**: 3",
                                   "**Final Answer:** 3", "Final answer:\n3", "  Final answer: 3.",
                                   "Final answer： 3"],
                         ids=["plain", "title-case", "upper-case", "bold-colon-outside", "bold-colon-inside",
                              "answer-next-line", "indented-with-period", "full-width-colon"])
def test_final_answer_variants_end_the_last_step(final):
    body = f"{QUESTION}\n\nStep 1: one red circle.\nStep 2: two red squares, so 1 + 2 = 3."
    text = f"{body}\n{final}"
    prefixes = split_step_prefixes(text)
    assert prefixes[-1] == body
    assert len(prefixes) == 2
    assert final_answer(text) == "3"


def test_final_answer_on_the_same_line_as_the_last_step():
    text = "Q?\nStep 1: a.\nStep 2: 1 + 2 = 3. Final answer: 3"
    assert split_step_prefixes(text) == ["Q?\nStep 1: a.", "Q?\nStep 1: a.\nStep 2: 1 + 2 = 3."]


def test_final_answer_words_inside_the_last_step_do_not_cut_it():
    # "the final answer is 3" is part of step 2; only the "Final answer:" line ends it.
    text = "Q?\nStep 1: one circle.\nStep 2: So the final answer is 3.\nFinal answer: 3"
    assert split_step_prefixes(text) == ["Q?\nStep 1: one circle.",
                                         "Q?\nStep 1: one circle.\nStep 2: So the final answer is 3."]


def test_final_answer_before_the_steps_is_ignored():
    text = "Give a final answer: how many?\nStep 1: one.\nStep 2: two.\nFinal answer: 2"
    prefixes = split_step_prefixes(text)
    assert prefixes[-1] == "Give a final answer: how many?\nStep 1: one.\nStep 2: two."


def test_multi_line_steps():
    text = ("Q?\n\nStep 1: Count the circles.\n- top left: red\n- center: blue\nThat is 2 circles.\n\n"
            "Step 2: Count the squares.\nThere is 1 square.\n\nStep 3: 2 + 1 = 3 shapes.\n\nFinal answer: 3\n")
    prefixes = split_step_prefixes(text)
    assert prefixes == [
        "Q?\n\nStep 1: Count the circles.\n- top left: red\n- center: blue\nThat is 2 circles.",
        "Q?\n\nStep 1: Count the circles.\n- top left: red\n- center: blue\nThat is 2 circles.\n\n"
        "Step 2: Count the squares.\nThere is 1 square.",
        "Q?\n\nStep 1: Count the circles.\n- top left: red\n- center: blue\nThat is 2 circles.\n\n"
        "Step 2: Count the squares.\nThere is 1 square.\n\nStep 3: 2 + 1 = 3 shapes.",
    ]


def test_text_before_step_1_is_in_every_prefix():
    preamble = "<image>\nQuestion: what is the area?\nChoices: (A) 1 (B) 2\nLet's think step by step.\n"
    text = preamble + "Step 1: width 1.\nStep 2: height 2.\nStep 3: area 2.\nFinal answer: B"
    prefixes = split_step_prefixes(text)
    assert len(prefixes) == 3
    assert all(p.startswith(preamble) for p in prefixes)
    # Each prefix extends the previous one.
    assert all(b.startswith(a) for a, b in zip(prefixes, prefixes[1:]))


def test_two_digit_step_numbers():
    lines = [f"Step {n}: value {n}." for n in range(1, 13)]
    text = "Q?\n" + "\n".join(lines) + "\nFinal answer: 12"
    prefixes = split_step_prefixes(text)
    assert len(prefixes) == 12
    assert prefixes[9].endswith("Step 10: value 10.")
    assert prefixes[10].endswith("Step 11: value 11.")
    assert prefixes[11] == "Q?\n" + "\n".join(lines)
    assert final_answer(text) == "12"


def test_back_reference_to_an_earlier_step_is_not_a_marker():
    text = "Q?\nStep 1: 2 circles.\nStep 2: From Step 1. we have 2; add 1 square.\nStep 3: 3.\nFinal answer: 3"
    prefixes = split_step_prefixes(text)
    assert len(prefixes) == 3
    assert prefixes[1] == "Q?\nStep 1: 2 circles.\nStep 2: From Step 1. we have 2; add 1 square."


def test_mentions_of_step_without_a_number_or_separator_are_not_markers():
    text = "Think step by step. Is step 2 hard?\nStep 1: a, as in step 1, b.\nFinal answer: b"
    assert step_marker_positions(text) == [text.index("Step 1:")]
    assert split_step_prefixes(text) == ["Think step by step. Is step 2 hard?\nStep 1: a, as in step 1, b."]


@pytest.mark.parametrize("text", ["", "Q?", "How many shapes? I think 3.\nFinal answer: 3", "Steps: 1, 2, 3"],
                         ids=["empty", "question-only", "no-steps-with-final", "steps-word-without-number"])
def test_no_step_marker_gives_no_prefix(text):
    assert split_step_prefixes(text) == []
    assert step_marker_positions(text) == []


def test_prefixes_have_no_trailing_whitespace():
    text = "Q?\n\nStep 1: a   \n\n\nStep 2: b \t\n\nFinal answer: 1"
    assert split_step_prefixes(text) == ["Q?\n\nStep 1: a", "Q?\n\nStep 1: a   \n\n\nStep 2: b"]


@pytest.mark.parametrize("text,expected", [
    ("Step 1: a\nFinal answer: 3", "3"),
    ("Step 1: a\nFinal answer: 3.", "3"),
    ("Step 1: a\n**Final answer**: 3", "3"),
    ("Step 1: a\n**Final Answer: 3**", "3"),
    ("Step 1: a\nFinal answer: (B) 12 cm\nSome trailing note.", "(B) 12 cm"),
    ("Step 1: a\nFinal answer: Yes", "Yes"),
    ("Step 1: a\nFinal answer:\n\n42", "42"),
    ("Final answer: 1\nStep 1: wait, redo.\nFinal answer: 2", "2"),  # the last marker counts
    ("Step 1: a\nFinal answer:", ""),
    ("Step 1: a\nSo the answer is 3.", None),
    ("Step 1: so the final answer is 3.", None),  # prose, not a marker
], ids=["plain", "trailing-period", "bold-label", "bold-all", "first-line-only", "word", "next-line", "last-wins",
        "empty", "absent", "prose-only"])
def test_final_answer_extraction(text, expected):
    assert final_answer(text) == expected
