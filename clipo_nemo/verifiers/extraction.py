"""Reading the final answer out of a response: the last ``\\boxed{...}`` and its clean-up.

These are plain string functions (no sympy), cheap enough to run on a 1 MB response; everything that
can be slow lives in :mod:`clipo_nemo.verifiers.math_verifier` and runs under the pool's time limit.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

# ``\boxed`` or ``\fbox`` not followed by another letter (so ``\boxedfoo`` is not a box).
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


class MalformedBoxError(ValueError):
    """The last box opens a brace group that never closes."""


def _braced_group_end(text: str, open_pos: int) -> int:
    """Index just past the ``}`` that closes the ``{`` at ``open_pos``; escaped ``\\{ \\}`` do not count."""
    depth = 0
    pos = open_pos
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            pos += 2  # an escaped character (``\{``, ``\}``, ``\\``) never opens or closes a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return pos + 1
        pos += 1
    raise MalformedBoxError(f"unbalanced braces in the box starting at character {open_pos}")


def last_boxed_content(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed 5`` in ``text``.

    Returns ``None`` when there is no box, ``""`` for an empty one. Nested braces are matched, so
    ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. The brace-less form takes the run of
    non-space characters up to a ``$`` (``\\boxed 5$`` gives ``5``). Raises
    :class:`MalformedBoxError` when the last box's braces never close.
    """
    last = None
    for last in _BOX_COMMAND.finditer(text):
        pass
    if last is None:
        return None
    pos = last.end()
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if pos == len(text):
        return ""
    if text[pos] == "{":
        return text[pos + 1 : _braced_group_end(text, pos) - 1]
    bare = re.match(r"[^\s$]*", text[pos:])
    return bare.group(0)


def boxed_answer(response: str) -> Tuple[Optional[str], Optional[str]]:
    """The answer in the response's last box, and why there is none to judge.

    Returns ``(answer, None)`` for a non-empty box; otherwise ``(what was found, reason)`` with reason
    ``empty`` (blank response or empty box), ``parse_error`` (unbalanced box) or ``no_box``.
    """
    if not response.strip():
        return None, "empty"
    try:
        boxed = last_boxed_content(response)
    except MalformedBoxError:
        return None, "parse_error"
    if boxed is None:
        return None, "no_box"
    if not boxed.strip():
        return boxed, "empty"
    return boxed, None


def reference_answer(ground_truth: str) -> str:
    """The reference answer of a row: the last boxed answer when the ground truth is a whole
    worked solution (``train/math75``), otherwise the ground truth itself, stripped."""
    boxed = last_boxed_content(ground_truth)
    return (boxed if boxed is not None else ground_truth).strip()


# Text wrappers whose argument is what the reader sees (``\text{C}`` reads as ``C``).
_WRAPPER = r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mbox|emph)\s*"
_TEXT_WRAPPER = re.compile(_WRAPPER + r"\{([^{}]*)\}")
# A wrapper holding a number, maybe followed by text without digits: ``\text{8}``, ``\mathrm{8.0}``, ``\text{ 8 cm}``.
_NUMBER_WRAPPER = re.compile(_WRAPPER + r"\{\s*([-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[^{}\d]*[^{}\d\s])?)\s*\}")


def unwrap_text(answer: str) -> str:
    """Replace every ``\\text{x}``-like wrapper by ``x`` (innermost first, so nesting unwraps fully)."""
    previous = None
    while previous != answer:
        previous, answer = answer, _TEXT_WRAPPER.sub(r"\1", answer)
    return answer


def unwrap_numbers(answer: str) -> str:
    """Replace every text wrapper that holds a number (maybe followed by unit words) by its content:
    ``\\text{8}`` -> ``8``, ``\\text{ 8 cm}`` -> ``8 cm``. Wrappers of words (``\\text{east}``) stay, so
    math-verify never reads a word as a product of symbols."""
    return _NUMBER_WRAPPER.sub(r"\1", answer)
