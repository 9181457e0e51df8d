"""What every rollout engine takes and returns, and the registry of engines.

An engine is built once per run with ``build_rollout_engine(cfg.rollout, model=..., tokenizer=...,
cfg=cfg)`` (every registered factory takes the policy, the tokenizer and the whole
:class:`clipo_nemo.config.ClipoConfig`) and then called every step::

    out = engine.generate(prompt_token_ids, GenerationParams.from_config(cfg.rollout), seeds)

Responses come back grouped: rows ``i * n .. i * n + n - 1`` of the output belong to prompt ``i``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Protocol, Sequence, Tuple

import torch

FINISH_STOP = "stop"  # an EOS token or a stop string ended the response
FINISH_LENGTH = "length"  # max_new_tokens was reached first


@dataclass(frozen=True)
class GenerationParams:
    """How to sample: ``n`` responses per prompt, each at most ``max_new_tokens`` long."""

    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off; 1 = greedy
    top_p: float = 1.0  # 1.0 = off
    stop: Tuple[str, ...] = ()  # stop strings, besides the EOS tokens

    def __post_init__(self) -> None:
        problems = []
        if self.n < 1:
            problems.append(f"n={self.n} must be >= 1")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p} must lie in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop={self.stop!r} must hold non-empty strings")
        if problems:
            raise ValueError("invalid generation parameters: " + "; ".join(problems))

    @classmethod
    def from_config(cls, rollout) -> "GenerationParams":
        """From a :class:`clipo_nemo.config.RolloutConfig`."""
        return cls(
            n=rollout.n, max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
            top_k=rollout.top_k, top_p=rollout.top_p, stop=tuple(rollout.stop),
        )


@dataclass
class RolloutOutput:
    """Generated responses, ``len(prompts) * n`` rows, grouped by prompt.

    ``tokens`` [N, T] long holds each response right-padded with ``pad_token_id`` (``T`` = the
    longest response); ``lengths`` [N] long counts its tokens, which include the EOS token or the
    token that completed a stop string. ``finish_reasons[i]`` is ``"stop"`` or ``"length"``.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    finish_reasons: List[str]
    prompt_index: torch.Tensor  # [N] long: the prompt each row answers
    pad_token_id: int

    def response(self, row: int) -> List[int]:
        """Token ids of one response, without padding."""
        return self.tokens[row, : int(self.lengths[row])].tolist()


class RolloutEngine(Protocol):
    """The interface the trainer calls."""

    def generate(
        self, prompts: Sequence[Sequence[int]], params: GenerationParams, seeds: Sequence[int]
    ) -> RolloutOutput:
        """Sample ``params.n`` responses for each prompt (token ids); ``seeds[i]`` seeds prompt ``i``'s."""


ROLLOUT_ENGINES: Dict[str, Callable[..., RolloutEngine]] = {}


def register_rollout_engine(name: str) -> Callable:
    """Decorator for a factory ``(model, tokenizer, cfg) -> RolloutEngine``: buildable as ``rollout.engine=<name>``."""

    def register(factory: Callable[..., RolloutEngine]) -> Callable[..., RolloutEngine]:
        if name in ROLLOUT_ENGINES:
            raise ValueError(f"rollout engine {name!r} is already registered")
        ROLLOUT_ENGINES[name] = factory
        return factory

    return register


def build_rollout_engine(rollout, **engine_args) -> RolloutEngine:
    """Build the engine named by ``rollout.engine`` (a :class:`clipo_nemo.config.RolloutConfig`)."""
    if rollout.engine not in ROLLOUT_ENGINES:
        raise ValueError(f"rollout.engine={rollout.engine!r}: expected one of {sorted(ROLLOUT_ENGINES)}")
    return ROLLOUT_ENGINES[rollout.engine](**engine_args)


def validate_prompts(prompts: Sequence[Sequence[int]], seeds: Sequence[int], vocab_size: int) -> None:
    """Clear errors for empty prompts, out-of-vocabulary ids, or a seed count that does not match."""
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} has no tokens")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
