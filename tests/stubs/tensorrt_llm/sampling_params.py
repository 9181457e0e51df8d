"""Stand-in for ``tensorrt_llm/sampling_params.py`` (the fields the engine uses).

Follows the real ``SamplingParams``: ``_validate`` (``top_k >= 0``, ``0 <= top_p <= 1``,
``temperature >= 0``, ``best_of >= n``); ``_setup(tokenizer)`` fills ``end_id`` / ``pad_id`` from the
tokenizer and tokenizes ``stop`` into ``_stop_word_ids`` (``tokenizer.encode(s,
add_special_tokens=False)``) -- the only place stop strings become token sequences;
``_get_stop_words()`` raises ``RuntimeError("SamplingParams.stop (...) is not processed by tokenizer,
please call the setup method.")`` when ``stop`` is set but ``_setup`` never ran; greedy iff
``params_imply_greedy_decoding`` (``temperature``, ``top_p``, ``top_k`` all None, or ``top_k == 1``,
or ``top_p == 0``, or ``temperature == 0``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union


@dataclass
class SamplingParams:
    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    max_tokens: int = 32
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    include_stop_str_in_output: bool = False
    n: int = 1
    best_of: Optional[int] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    temperature: Optional[float] = None
    logprobs: Optional[int] = None
    detokenize: bool = True
    _stop_word_ids: Optional[List[List[int]]] = field(default=None, repr=False)

    def __post_init__(self):
        self.best_of = self.best_of or self.n
        self._validate()

    def _validate(self) -> None:
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"require top_k >= 0, got top_k={self.top_k}")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError(f"require 0 <= top_p <= 1, got top_p={self.top_p}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"require temperature >= 0, got temperature={self.temperature}")

    @property
    def stop_strings(self) -> List[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def _setup(self, tokenizer) -> "SamplingParams":
        if self.end_id is None:
            self.end_id = tokenizer.eos_token_id
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id
        if self.stop_strings:
            self._stop_word_ids = [tokenizer.encode(s, add_special_tokens=False) for s in self.stop_strings]
        return self

    def _get_stop_words(self) -> List[List[int]]:
        """Every stop sequence: ``stop_token_ids`` as one-token words plus the tokenized ``stop``."""
        words = [[int(t)] for t in self.stop_token_ids or []]
        if self.stop_strings:
            if self._stop_word_ids is None:
                raise RuntimeError(f"SamplingParams.stop ({self.stop}) is not processed by tokenizer, please call "
                                   "the setup method.")
            words += self._stop_word_ids
        return words

    @property
    def greedy(self) -> bool:
        """``params_imply_greedy_decoding``."""
        return ((self.temperature is None and self.top_p is None and self.top_k is None) or self.top_k == 1
                or self.top_p == 0 or self.temperature == 0)
