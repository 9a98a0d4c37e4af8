"""Rewards a program checks, for GRPO: `function(completion, answer) -> float`, by name.

They live with the data because a prompt file names them (a line's optional "reward" key);
6-grpo.py's --reward picks one for lines that name none, --reward_fn brings your own.
"""

import math
import re
import unicodedata


def final_answer(text, spaced=False):
    """What follows the last "答案"/"answer" marker, else the whole text, NFKC-folded, lower-cased, without
    whitespace or punctuation, but for the marks that make a number (a minus before a digit, a decimal point or a
    fraction's bar between two), and the thousands' commas of numbers. `spaced`: a run of whitespace and punctuation
    between two ASCII letters or digits (or before a negative number) is one space instead, so words and numbers stay
    apart."""
    marker = list(re.finditer(r"(答案|\banswer\b)\s*(is|是|为)?\s*[:：]?", text, flags=re.I))
    text = text[marker[-1].end():] if marker else text
    text = THOUSANDS.sub("", unicodedata.normalize("NFKC", text).lower())
    numeric = {mark.start() for mark in NUMBER_MARKS.finditer(text)}
    kept = "".join(ch if at in numeric or not (ch.isspace() or unicodedata.category(ch).startswith("P"))
                   else " " for at, ch in enumerate(text))
    if not spaced:
        return kept.replace(" ", "")
    return re.sub(r"(?<![a-z0-9]) | (?![a-z0-9]|-\d)", "", " ".join(kept.split()))


NUMBER_MARKS = re.compile(r"(?<!\d)-(?=\d)|(?<=\d)[./](?=\d)")


def exact_match(completion, answer):
    """1.0 when the normalised final answer of the completion equals the normalised answer."""
    return float(final_answer(completion) == final_answer(answer))


# A number, signed by a minus that follows no letter or digit ("3-5" is 3 and 5, "= -5" is -5)
NUMBER = re.compile(r"(?:(?<![0-9A-Za-z.])-)?(?<![0-9.])\d+(?:\.\d+)?")


def numeric_match(completion, answer):
    """1.0 when the completion's last number equals the answer's number (thousands' commas ignored in both)."""
    expected = number_answer(answer)
    if expected is None:
        raise ValueError(f"the answer {answer!r} is not a number, which the numeric reward compares with")
    found = NUMBER.findall(THOUSANDS.sub("", completion))
    return float(bool(found) and math.isclose(float(found[-1]), expected, rel_tol=1e-9, abs_tol=1e-9))


def number_answer(answer):
    """The number an answer for the numeric reward holds (thousands' commas allowed), or None."""
    try:
        value = float(THOUSANDS.sub("", answer.strip()))
    except ValueError:
        return None
    return value if math.isfinite(value) else None  # "nan" or "inf" would match nothing, silently


THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # the comma in 1,000 (not in 1,5)


def contains(completion, answer):
    """1.0 when the normalised answer appears in the normalised completion (a next line inside a sentence) as a whole:
    a Latin word or a number not inside a longer one ("5" is not in "15", "-5" or "3.5"; "no" is not in "know")."""
    needle = final_answer(answer, spaced=True)
    return float(bool(needle) and re.search(rf"(?<![a-z0-9./\-]){re.escape(needle)}(?![a-z0-9]|[./]\d)",
                                            final_answer(completion, spaced=True)) is not None)


REWARDS = {"exact": exact_match, "numeric": numeric_match, "contains": contains}
