"""Rewards a program checks, for GRPO: `function(completion, answer) -> float`, by name.

They live with the data because a prompt file names them (a line's optional "reward" key);
6-grpo.py's --reward picks one for lines that name none, --reward_fn brings your own.
"""

import math
import re
import unicodedata


def final_answer(text):
    """What follows the last "答案"/"answer" marker, else the whole text, NFKC-folded, lower-cased, without
    whitespace or punctuation, but for the marks that make a number (a minus before a digit, a decimal point or a
    fraction's bar between two)."""
    marker = list(re.finditer(r"(答案|\banswer\b)\s*(is|是|为)?\s*[:：]?", text, flags=re.I))
    text = text[marker[-1].end():] if marker else text
    text = unicodedata.normalize("NFKC", text).lower()
    numeric = {mark.start() for mark in NUMBER_MARKS.finditer(text)}
    return "".join(ch for at, ch in enumerate(text)
                   if at in numeric or not (ch.isspace() or unicodedata.category(ch).startswith("P")))


NUMBER_MARKS = re.compile(r"(?<!\d)-(?=\d)|(?<=\d)[./](?=\d)")


def exact_match(completion, answer):
    """1.0 when the normalised final answer of the completion equals the normalised answer."""
    return float(final_answer(completion) == final_answer(answer))


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def numeric_match(completion, answer):
    """1.0 when the completion's last number equals the answer's number (thousands' commas ignored in both)."""
    found = NUMBER.findall(THOUSANDS.sub("", completion))
    return float(bool(found) and math.isclose(float(found[-1]), float(THOUSANDS.sub("", answer)), rel_tol=1e-9,
                                              abs_tol=1e-9))


THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # the comma in 1,000 (not in 1,5)


def contains(completion, answer):
    """1.0 when the normalised answer appears in the normalised completion (a next line inside a sentence)."""
    return float(bool(final_answer(answer)) and final_answer(answer) in final_answer(completion))


REWARDS = {"exact": exact_match, "numeric": numeric_match, "contains": contains}
