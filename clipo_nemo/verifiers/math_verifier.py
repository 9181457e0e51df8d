"""The ``math`` verifier: the last boxed answer against the reference, by ``math-verify`` equivalence.

``math-verify`` decides equivalence (numbers, fractions, radicals, intervals, tuples, sets,
``x = 3`` vs ``3``). A few forms it does not read are rewritten first by
:func:`normalize_math_answer`, on both sides, so that the library sees the same clean LaTeX:
LaTeX spacing (``3\\,000``), percent and degree marks, dollar signs, and unit words after a number
(``5 \\text{ cm}``, ``12 inches``). Boolean answers (TheoremQA's ``True``/``False``) are compared as
words. Anything slow (sympy can hang) runs in a pool worker under a hard time limit, never here
directly in a training process.
"""
from __future__ import annotations

import functools
import math
import re
from decimal import Decimal
from typing import Tuple

from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify
from sympy import Basic, MatrixBase

from clipo_nemo.verifiers.extraction import boxed_answer, unwrap_numbers, unwrap_text

# Everything is parsed from ``\boxed{<answer>}``, so the box is the only pattern math-verify needs.
_EXTRACTION = (
    LatexExtractionConfig(
        boxed_match_priority=0,
        normalization_config=NormalizationConfig(
            basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all", equations=False
        ),
    ),
)

# ``\\`` (a line break, e.g. between matrix rows) is matched first so its second backslash is never
# read as the start of a spacing command like ``\ `` or ``\,``.
_SPACING = re.compile(r"(?P<linebreak>\\\\)|\\[,;:! ]|\\q?quad(?![A-Za-z])|~")
_THOUSANDS_SPACING = re.compile(r",\\!\s*")  # ``10,\!080``: a thousands separator with a negative space
_SCIENTIFIC = re.compile(r"^[-+]?\d+(?:\.\d+)?[eE][-+]?\d+$")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree(?![A-Za-z])|°")
_PERCENT = re.compile(r"\\?%")
_DOLLAR = re.compile(r"\\?\$")
# A value with a digit, then a unit in a text wrapper: ``\frac{270}7\text{ degrees}``, ``5\text{ cm}^2``.
_WRAPPED_UNIT = re.compile(
    r"^(?P<value>.*\d.*?)\s*\\(?:text|mbox|mathrm|textnormal)\s*\{[^{}\d]*\}(?:\^\{?[23]\}?)?$"
)
# A plain number-like value (no letters, no commands), a space, then words: ``12 inches``, ``5 sq ft``.
_PLAIN_UNIT = re.compile(r"^(?P<value>[^A-Za-z\\]*\d[^A-Za-z\\]*?)\s+[A-Za-z]{2,}[A-Za-z .]*(?:\^\{?[23]\}?)?$")
_SPACED_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?$")  # ``3 889 620``
_SENTENCE_END = re.compile(r"(?<=[\d}])\s*\.$")  # ``8.``, ``\text{8}.``: the full stop after an answer
_BOOLEANS = ("true", "false")


def normalize_math_answer(answer: str) -> str:
    """Rewrite the forms math-verify does not read into ones it does; keep the rest untouched.

    ``3\\,000`` -> ``3000``, ``50\\%`` -> ``50``, ``30^{\\circ}`` -> ``30``, ``\\$5`` -> ``5``,
    ``5 \\text{ cm}`` -> ``5``, ``12 inches`` -> ``12``, ``4e-05`` -> ``0.00004``,
    ``\\text{8}`` / ``\\mathrm{8 cm}`` -> ``8`` (a wrapper of words stays), ``8.`` -> ``8``,
    ``3 889 620`` -> ``3889620``, a Unicode minus -> ``-``.
    Percent is dropped rather than divided by 100 because the paper's references state percentages
    as bare numbers (GSM: ``20`` for 20%).
    """
    answer = unwrap_numbers(answer).replace("\u2212", "-")
    answer = _THOUSANDS_SPACING.sub(",", answer)
    answer = _SPACING.sub(lambda match: match.group("linebreak") or "", answer)
    answer = answer.replace("\\varnothing", "\\emptyset")
    answer = _DEGREES.sub("", answer)
    answer = _PERCENT.sub("", answer)
    answer = _SENTENCE_END.sub("", _DOLLAR.sub("", answer).strip())
    if _SPACED_THOUSANDS.match(answer):
        answer = answer.replace(" ", "")
    for unit_pattern in (_WRAPPED_UNIT, _PLAIN_UNIT):
        match = unit_pattern.match(answer)
        if match:
            answer = match.group("value").strip()
    if _SCIENTIFIC.match(answer):  # ``4e-05`` would read as ``4 e - 5`` with Euler's e; a plain decimal is a
        answer = format(Decimal(answer), "f")  # number math-verify compares like any other (fractions too)
    return answer


def _boolean_word(answer: str) -> str | None:
    word = unwrap_text(answer).strip().lower()
    return word if word in _BOOLEANS else None


@functools.lru_cache(maxsize=16384)
def _parse(answer: str) -> list:
    """Parsed answers are cached: a reference meets all ``k`` samples, and samples often agree."""
    return parse("\\boxed{" + answer + "}", _EXTRACTION)


def _has_expression(parsed: list) -> bool:
    return any(isinstance(item, (Basic, MatrixBase)) for item in parsed)


def check_math(response: str, reference: str) -> Tuple[float, str, str | None]:
    """Judge ``response`` against the reference answer (already taken out of any worked solution).

    Returns ``(reward, reason, extracted)``: reward 1.0 with reason ``ok``, else 0.0 with ``wrong``,
    ``empty`` (blank response or empty box), ``no_box`` or ``parse_error`` (unbalanced box, or an
    answer math-verify cannot read). ``extracted`` is the boxed answer (``None`` without a box).
    """
    boxed, failure = boxed_answer(response)
    if failure is not None:
        return 0.0, failure, boxed
    predicted = normalize_math_answer(boxed)
    gold = normalize_math_answer(reference)
    if predicted == gold or unwrap_text(predicted) == unwrap_text(gold):
        return 1.0, "ok", boxed
    gold_boolean = _boolean_word(gold)
    if gold_boolean is not None:
        return (1.0, "ok", boxed) if _boolean_word(predicted) == gold_boolean else (0.0, "wrong", boxed)
    reason = _judge(gold, predicted)
    return (1.0 if reason == "ok" else 0.0), reason, boxed


def _float_rounding(parsed_gold: list) -> int:
    """Decimal places math-verify rounds floats to before comparing them: its default 6, or, for a
    small numeric reference, enough for four significant digits (at 6 places ``3.5e-08`` equals both
    ``0`` and ``3.5e-07``)."""
    for item in parsed_gold:
        if isinstance(item, Basic) and item.is_number:
            try:
                magnitude = abs(float(item.evalf()))
            except (TypeError, ValueError):  # complex or symbolic: math-verify's default
                return 6
            return max(6, 3 - math.floor(math.log10(magnitude))) if 0 < magnitude < 1e-3 else 6
    return 6


@functools.lru_cache(maxsize=16384)
def _judge(gold: str, predicted: str) -> str:
    """``ok``, ``wrong`` or ``parse_error`` for two normalised answers (cached like :func:`_parse`)."""
    parsed, parsed_gold = _parse(predicted), _parse(gold)
    if verify(parsed_gold, parsed, float_rounding=_float_rounding(parsed_gold)):
        return "ok"
    return "wrong" if _has_expression(parsed) else "parse_error"
