"""Numeric answers score 1 in every form instruct models write them in a box, against every reference
style of the shared test sets, and wrong numbers stay wrong in those same forms.

The oracle is independent of the verifier: each reference's value is read with Python's ``Fraction``
after stripping only the reference's own markup, and the model-side forms are written from that value.
"""
import re
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from clipo_nemo.verifiers.math_verifier import check_math

ROOT = Path(__file__).resolve().parents[1]
SHARED_TEST = ROOT.parent / "shared" / "data" / "clipo" / "test"
MATH_SETS = ("aime", "aime2025", "amc", "gsm8k", "gsm_p1", "gsm_p2", "gsm_symbolic", "math", "math_perturb_hard",
             "math_perturb_simple", "theoremqa")

# Every way a numeric reference is written in the shared test sets (found by scanning them), in the
# order they are tried; a numeric reference matching none fails the scan test below.
REFERENCE_STYLES = {
    "integer": r"-?[1-9]\d*|0",
    "leading zeros": r"0\d+",  # AIME: 025
    "float .0": r"-?\d+\.0",  # AMC: 142.0
    "decimal": r"-?\d+\.\d+",
    "leading-dot decimal": r"-?\.\d+",
    "comma thousands": r"-?\d{1,3}(?:,\d{3})+",
    "comma-\\! thousands": r"-?\d{1,3}(?:,\\!\d{3})+",
    "dollars": r"\\\$\d{1,3}(?:(?:,\\!)?\d{3})*(?:\.\d+)?",
    "degrees": r"\d+\^\\circ",
    "scientific": r"-?\d+(?:\.\d+)?e[-+]\d+",
    "\\frac": r"-?\\frac\{\d+\}\{\d+\}",
    "slash fraction": r"-?\d+/\d+",
}


def reference_value(reference: str) -> Optional[Fraction]:
    """The value of a numeric reference, or None (expressions, tuples, words, ``204_5`` in base 5)."""
    if "_" in reference:  # Fraction would read 204_5 as 2045
        return None
    plain = reference.replace("\\$", "").replace(",\\!", "").replace("^\\circ", "")
    plain = re.sub(r"(?<=\d),(?=\d{3}(?:\D|$))", "", plain)
    frac = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", plain)
    if frac:
        return Fraction(int(frac.group(2)), int(frac.group(3))) * (-1 if frac.group(1) else 1)
    try:
        return Fraction(plain)
    except (ValueError, ZeroDivisionError):
        return None


def _decimal(value: Fraction) -> Optional[str]:
    """``value`` as a finite decimal string, or None when it has none (1/3)."""
    for places in range(0, 12):
        scaled = value * 10 ** places
        if scaled.denominator == 1:
            digits = str(abs(scaled.numerator)).rjust(places + 1, "0")
            text = digits if places == 0 else f"{digits[:-places]}.{digits[-places:]}"
            return ("-" if value < 0 else "") + text
    return None


def _thousands(number: str, separator: str) -> str:
    sign, digits = ("-", number[1:]) if number.startswith("-") else ("", number)
    groups = []
    while digits:
        groups.insert(0, digits[-3:])
        digits = digits[:-3]
    return sign + separator.join(groups)


# How a number is dressed in a box: units, percent and degree marks, dollars, spacing, a full stop.
DRESS = ("{n}", "${n}$", "{n}\\text{{ cm}}", "{n} \\text{{cm}}", "{n}\\ \\text{{cm}}", "{n}\\,\\mathrm{{m/s}}",
         "{n}~\\text{{units}}", "{n}\\text{{ cm}}^2", "{n}\\%", "{n}\\,\\%", "{n}^\\circ", "{n}^{{\\circ}}", "{n}°",
         "{n}\\text{{ degrees}}", "{n}.", "{n}\\,", "\\,{n}", "{{{n}}}", "\\displaystyle {n}")
# Text wrappers around the digits themselves (``\text{8}``): written around numbers, not around fractions.
TEXT_DRESS = ("\\text{{{n}}}", "\\mathrm{{{n}}}", "\\textbf{{{n}}}", "\\mathbf{{{n}}}", "\\text{{{n} cm}}", "{n} cm",
              "\\mathrm{{{n}}}\\text{{ cm}}", "\\text{{{n}}}.", "\\text{{ {n} }}")


def written_forms(value: Fraction) -> List[str]:
    """What instruct models put in a box for ``value``: wrappers, units, marks, spacing, signs, stops."""
    decimal = _decimal(value)
    forms = []
    if decimal is not None:
        forms += [dress.format(n=decimal) for dress in DRESS + TEXT_DRESS]
        forms.append(f"+{decimal}" if value >= 0 else decimal.replace("-", "\u2212", 1))  # a leading +, a Unicode minus
    if value.denominator != 1:
        a, b = abs(value.numerator), value.denominator
        sign = "-" if value < 0 else ""
        for n in (f"{sign}\\frac{{{a}}}{{{b}}}", f"{sign}\\dfrac{{{a}}}{{{b}}}", f"{sign}\\tfrac{{{a}}}{{{b}}}",
                  f"{sign}{a}/{b}", f"\\frac{{{sign}{a}}}{{{b}}}"):
            forms += [dress.format(n=n) for dress in DRESS]
    if decimal is not None and value.denominator == 1:
        forms += [f"{decimal}.0", f"{decimal}.00", f"\\text{{{decimal}.0}}", f"\\$ {decimal}", f"\\${decimal}.00",
                  f"{decimal} dollars"]
        if abs(value) >= 1000:
            forms += [_thousands(decimal, sep) for sep in (",", "{,}", "\\,", ",\\!", "\\!", " ", "\\ ")]
    elif decimal is not None:
        forms += [f"{decimal}0", f"\\text{{{decimal}0}}"]
        if decimal.lstrip("-").startswith("0."):
            forms.append(decimal.replace("0.", ".", 1))
    return forms


def wrong_forms(value: Fraction) -> List[str]:
    """Near misses of ``value`` in the same dress: another value, or digits run together."""
    other = [value + 1, value * 10, -value if value else Fraction(1), value + Fraction(1, 10)]
    forms = []
    for wrong in other:
        decimal = _decimal(wrong)
        n = decimal if decimal is not None else f"\\frac{{{wrong.numerator}}}{{{wrong.denominator}}}"
        forms += [n, f"\\text{{{n}}}", f"\\mathrm{{{n}}}\\text{{ cm}}", f"{n}.", f"{n}^\\circ", f"\\${n}"]
    return forms


def _shared_references() -> Dict[str, List[str]]:
    from clipo_nemo.data.problems import load_problems

    if not SHARED_TEST.is_dir():
        pytest.skip(f"the shared test sets are not at {SHARED_TEST}")
    return {name: [p.reference for p in load_problems([SHARED_TEST / f"{name}.parquet"], on_bad_row="skip").problems]
            for name in MATH_SETS}


def _style(reference: str) -> Optional[str]:
    return next((style for style, pattern in REFERENCE_STYLES.items() if re.fullmatch(pattern, reference)), None)


@pytest.fixture(scope="module")
def numeric_references() -> Dict[str, List[str]]:
    """Up to 12 distinct numeric references of each style found in the shared test sets."""
    by_style: Dict[str, List[str]] = {}
    for references in _shared_references().values():
        for reference in references:
            style = _style(reference)
            if style is not None and reference not in by_style.setdefault(style, []) and len(by_style[style]) < 12:
                by_style[style].append(reference)
    return by_style


def test_every_numeric_reference_style_of_the_shared_sets_is_covered():
    """The scan: a numeric reference (one ``Fraction`` reads) in a style not listed here fails."""
    unlisted = sorted({(name, ref) for name, refs in _shared_references().items() for ref in refs
                       if reference_value(ref) is not None and _style(ref) is None})
    assert not unlisted, f"numeric references in a style the table does not cover: {unlisted[:20]}"
    found = {_style(ref) for refs in _shared_references().values() for ref in refs} - {None}
    assert found == set(REFERENCE_STYLES) - {"slash fraction"} | ({"slash fraction"} & found), found


def test_the_amc_case_from_the_issue():
    reference = next(r for r in _shared_references()["amc"] if r == "8.0")
    assert check_math("So the answer is $\\boxed{\\text{8}}$.", reference)[:2] == (1.0, "ok")
    assert check_math("So the answer is $\\boxed{\\text{9}}$.", reference)[:2] == (0.0, "wrong")


@pytest.mark.parametrize("style", list(REFERENCE_STYLES))
def test_written_forms_score_1_against_each_reference_style(style, numeric_references):
    references = numeric_references.get(style) or {"slash fraction": ["-7/2"]}.get(style, [])
    assert references, f"no reference of style {style!r}"
    failures = []
    for reference in references:
        value = reference_value(reference)
        assert value is not None, reference
        for form in written_forms(value):
            reward, reason, _ = check_math(f"The answer is $\\boxed{{{form}}}$.", reference)
            if reward != 1.0:
                failures.append((reference, form, reason))
    assert not failures, f"{len(failures)} equivalent forms judged wrong, e.g. {failures[:10]}"


@pytest.mark.parametrize("style", list(REFERENCE_STYLES))
def test_wrong_numbers_stay_wrong_in_the_same_forms(style, numeric_references):
    references = numeric_references.get(style) or {"slash fraction": ["-7/2"]}.get(style, [])
    passed = []
    for reference in references[:6]:
        for form in wrong_forms(reference_value(reference)):
            reward, _, _ = check_math(f"\\boxed{{{form}}}", reference)
            if reward != 0.0:
                passed.append((reference, form))
    assert not passed, f"wrong answers judged right: {passed[:10]}"


@pytest.mark.parametrize("reference, answer", [
    ("2,125", "2,12"), ("2,125", "2 12"), ("2,125", "212"), ("1000", "1,000,0"), ("8", "8,0"),
    ("\\text{east}", "\\text{seat}"), ("\\text{Evelyn}", "\\text{Evenly}"), ("\\text{(C)}", "\\text{(D)}"),
    ("-2", "2"), ("-2", "+2"), ("8.0", "\\text{8 apples and 3}"), ("25", "2.5"), ("025", "0.25"),
    ("\\frac{14}{3}", "\\text{14}"), ("8.0", "8.01."),
])
def test_negative_cases(reference, answer):
    assert check_math(f"\\boxed{{{answer}}}", reference)[0] == 0.0
