"""The ``multiple_choice`` verifier: a letter read from the last box, among the letters offered.

The paper's multiple-choice prompts (MMLU, CommonsenseQA, TruthfulQA) list their options after an
``Options:`` line as ``A. text`` lines; :func:`offered_letters` reads them once when the data are
loaded, and a boxed letter the prompt does not offer never counts.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple

from clipo_nemo.verifiers.extraction import boxed_answer, unwrap_text

_OPTIONS_HEADER = re.compile(r"(?m)^\s*Options:\s*$")
_OPTION_LINE = re.compile(r"(?m)^([A-Z])\.\s")
# ``C``, ``(C)``, ``C.``, ``C)``, ``[C]``, and the same followed by the option's text: ``C. pizza``.
_LETTER_ALONE = re.compile(r"^[(\[]?([A-Z])[)\].:]?$")
_LETTER_WITH_TEXT = re.compile(r"^[(\[]?([A-Z])[)\].:]\s*\S")


def offered_letters(prompt_text: str) -> Tuple[str, ...]:
    """The option letters listed after the prompt's last ``Options:`` line (``A. ...`` lines).

    Raises ``ValueError`` when the prompt lists none, or when the letters are not ``A, B, C, ...``
    in order: a malformed option list would otherwise make every answer silently wrong.
    """
    headers = list(_OPTIONS_HEADER.finditer(prompt_text))
    if not headers:
        raise ValueError("multiple-choice prompt has no 'Options:' line")
    letters = tuple(_OPTION_LINE.findall(prompt_text[headers[-1].end() :]))
    expected = tuple(chr(ord("A") + i) for i in range(len(letters)))
    if not letters or letters != expected:
        raise ValueError(f"multiple-choice prompt lists options {letters}, expected A, B, C, ... in order")
    return letters


def boxed_letter(boxed: str, offered: Sequence[str]) -> Optional[str]:
    """The option letter a boxed answer names, or ``None`` when it names none of ``offered``.

    Accepts ``C``, ``(C)``, ``C.``, ``\\text{C}``, ``\\textbf{(C)}`` and ``C. <option text>``; letters
    are upper case, as the prompts write them.
    """
    answer = unwrap_text(boxed).replace("$", "").strip()
    match = _LETTER_ALONE.match(answer) or _LETTER_WITH_TEXT.match(answer)
    if match is None or match.group(1) not in offered:
        return None
    return match.group(1)


def check_multiple_choice(response: str, reference: str, offered: Sequence[str]) -> Tuple[float, str, str | None]:
    """Judge ``response`` against the reference letter; same return contract as ``check_math``.

    ``parse_error`` covers a box that names no offered letter (``\\boxed{Z}`` with options A-D).
    """
    if not offered:
        raise ValueError("multiple-choice check needs the prompt's offered letters; none were given")
    boxed, failure = boxed_answer(response)
    if failure is not None:
        return 0.0, failure, boxed
    letter = boxed_letter(boxed, offered)
    if letter is None:
        return 0.0, "parse_error", boxed
    return (1.0, "ok", boxed) if letter == reference.strip() else (0.0, "wrong", boxed)
