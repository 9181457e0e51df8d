"""The verifier registry, the request/result types, and the reason codes reported as metrics.

A verifier maps one :class:`VerifyRequest` to ``(reward, reason, extracted)``. It runs inside a pool
worker (:mod:`clipo_nemo.verifiers.pool`), which adds the ``timeout`` and ``error`` reasons for
checks that hang or crash, so no single response can stop a batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

from clipo_nemo.verifiers.choice_verifier import check_multiple_choice
from clipo_nemo.verifiers.math_verifier import check_math

# Every reason a result can carry; metrics report a count for each.
REASONS = ("ok", "wrong", "empty", "no_box", "parse_error", "timeout", "error")

# The paper's multiple-choice sets; every other data source is checked by the ``math`` verifier.
DEFAULT_MULTIPLE_CHOICE_SOURCES = ("conrl/mmlu2k", "conrl/commonsense_qa", "conrl/truthfulqa")

# Results keep at most this much of the boxed answer: enough to read, small to send between processes.
EXTRACTED_MAX_CHARS = 200


@dataclass(frozen=True)
class VerifyRequest:
    """One response to judge. ``response`` may be ``bytes`` (decoded as UTF-8, bad bytes replaced)."""

    verifier: str  # registry name: "math" | "multiple_choice"
    response: Union[str, bytes]
    reference: str  # the reference answer itself (see extraction.reference_answer)
    choices: Tuple[str, ...] = ()  # letters the prompt offers (multiple_choice only)


@dataclass(frozen=True)
class VerifyResult:
    reward: float  # 1.0 correct, 0.0 otherwise
    reason: str  # one of REASONS
    extracted: Optional[str] = None  # the boxed answer (truncated), None without one
    detail: Optional[str] = None  # for reason "error": the exception the verifier raised

    @property
    def correct(self) -> bool:
        return self.reward > 0


def _math(request: VerifyRequest, response: str) -> Tuple[float, str, Optional[str]]:
    return check_math(response, request.reference)


def _multiple_choice(request: VerifyRequest, response: str) -> Tuple[float, str, Optional[str]]:
    return check_multiple_choice(response, request.reference, request.choices)


VERIFIERS: Dict[str, Callable[[VerifyRequest, str], Tuple[float, str, Optional[str]]]] = {
    "math": _math,
    "multiple_choice": _multiple_choice,
}


def verifier_for_source(data_source: str, multiple_choice_sources: Sequence[str] = DEFAULT_MULTIPLE_CHOICE_SOURCES) -> str:
    """The registry name that checks rows of ``data_source``."""
    return "multiple_choice" if data_source in multiple_choice_sources else "math"


def check_request_valid(request: VerifyRequest, position: int) -> None:
    """Refuse, before any work starts, a request no verifier could judge (a bug, not a bad response)."""
    if request.verifier not in VERIFIERS:
        raise KeyError(f"request {position}: unknown verifier {request.verifier!r}; known: {sorted(VERIFIERS)}")
    if request.verifier == "multiple_choice" and not request.choices:
        raise ValueError(f"request {position}: multiple_choice request without the prompt's offered letters")


def run_verifier(request: VerifyRequest) -> VerifyResult:
    """Judge one request in this process, with no time limit (the pool adds it)."""
    response = request.response
    if isinstance(response, bytes):
        response = response.decode("utf-8", errors="replace")
    reward, reason, extracted = VERIFIERS[request.verifier](request, response)
    if extracted is not None and len(extracted) > EXTRACTED_MAX_CHARS:
        extracted = extracted[:EXTRACTED_MAX_CHARS] + "..."
    return VerifyResult(reward, reason, extracted)


def reason_counts(results: Sequence[VerifyResult]) -> Dict[str, int]:
    """How many results carry each reason (every reason present, zeros included)."""
    counts = dict.fromkeys(REASONS, 0)
    for result in results:
        counts[result.reason] += 1
    return counts
