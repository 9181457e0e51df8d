"""Verifiable rewards: a registry of answer checkers (``math``, ``multiple_choice``) and a worker
pool that runs them in parallel under a hard per-check time limit."""
from clipo_nemo.verifiers.choice_verifier import boxed_letter, check_multiple_choice, offered_letters
from clipo_nemo.verifiers.extraction import MalformedBoxError, last_boxed_content, reference_answer
from clipo_nemo.verifiers.math_verifier import check_math, normalize_math_answer
from clipo_nemo.verifiers.pool import VerifierPool, default_num_workers
from clipo_nemo.verifiers.registry import (
    DEFAULT_MULTIPLE_CHOICE_SOURCES,
    REASONS,
    VERIFIERS,
    VerifyRequest,
    VerifyResult,
    reason_counts,
    run_verifier,
    verifier_for_source,
)

__all__ = [
    "DEFAULT_MULTIPLE_CHOICE_SOURCES",
    "MalformedBoxError",
    "REASONS",
    "VERIFIERS",
    "VerifierPool",
    "VerifyRequest",
    "VerifyResult",
    "boxed_letter",
    "check_math",
    "check_multiple_choice",
    "default_num_workers",
    "last_boxed_content",
    "normalize_math_answer",
    "offered_letters",
    "reason_counts",
    "reference_answer",
    "run_verifier",
    "verifier_for_source",
]
