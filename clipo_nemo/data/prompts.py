"""Turning problems into model input: chat-template rendering, tokenisation, the length limit.

The instruction line is already part of each problem's text, so rendering adds only what the
tokenizer's chat template adds (with the generation prompt, so the model starts its answer turn).
A tokenizer without a chat template gets the raw text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

from clipo_nemo.data.problems import Message, Problem, RowSchema, load_problems


@dataclass(frozen=True)
class Prompt:
    """A problem ready for generation."""

    problem: Problem
    text: str  # what the model reads, rendered
    token_ids: Tuple[int, ...]  # ``text`` tokenised (special tokens as the template/tokenizer put them)


@dataclass
class PromptSet:
    prompts: List[Prompt] = field(default_factory=list)
    too_long: List[str] = field(default_factory=list)  # one "file row N: T tokens" line per filtered prompt
    skipped_rows: List[str] = field(default_factory=list)  # one "file row N: why" line per bad row skipped

    def metrics(self, split: str = "") -> Dict[str, int]:
        """Counts to log (``data/<split>/...`` with a split name): prompts kept, prompts over the length
        limit, bad rows skipped."""
        prefix = f"data/{split}/" if split else "data/"
        return {f"{prefix}prompts": len(self.prompts), f"{prefix}too_long": len(self.too_long),
                f"{prefix}skipped_rows": len(self.skipped_rows)}

    def report(self, split: str, shown: int = 5) -> List[str]:
        """Lines for the run's log: the counts, then the first ``shown`` dropped rows and why."""
        lines = [f"data {split}: {len(self.prompts)} prompts kept, {len(self.skipped_rows)} bad rows skipped "
                 f"(data.on_bad_row=skip), {len(self.too_long)} over data.max_prompt_length (data.truncation=filter)"]
        dropped = self.skipped_rows + self.too_long
        lines += [f"  dropped: {why}" for why in dropped[:shown]]
        if len(dropped) > shown:
            lines.append(f"  ... and {len(dropped) - shown} more")
        return lines


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(messages: Sequence[Message], tokenizer: Any) -> str:
    """The prompt text: the chat template with the generation prompt on, or, when the tokenizer has
    no template, the messages' contents joined by blank lines (one user message: its content)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n\n".join(message["content"] for message in messages)


def build_prompts(problems: Sequence[Problem], tokenizer: Any, max_prompt_length: int, truncation: str = "filter") -> PromptSet:
    """Render and tokenise every problem, applying the length limit.

    A prompt longer than ``max_prompt_length`` tokens is dropped and listed in ``too_long`` when
    ``truncation="filter"``, or raises ``ValueError`` naming its file and row when
    ``truncation="error"`` (the paper's setting). A chat-templated text is tokenised without adding
    special tokens (the template already wrote them); raw text gets the tokenizer's usual ones.
    """
    if truncation not in ("filter", "error"):
        raise ValueError(f"truncation must be 'filter' or 'error', got {truncation!r}")
    if max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
    texts = [render_prompt(problem.messages, tokenizer) for problem in problems]
    if not texts:
        return PromptSet()
    token_ids = tokenizer(texts, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    result = PromptSet()
    for problem, text, ids in zip(problems, texts, token_ids):
        if len(ids) > max_prompt_length:
            message = f"{problem.source_file} row {problem.row}: prompt has {len(ids)} tokens > max_prompt_length {max_prompt_length}"
            if truncation == "error":
                raise ValueError(message)
            result.too_long.append(message)
            continue
        result.prompts.append(Prompt(problem, text, tuple(ids)))
    return result


def load_prompt_set(files: Sequence[str], data_config: Any, tokenizer: Any) -> PromptSet:
    """Load, validate, render and length-check ``files`` as ``data_config`` (a ``DataConfig``) says."""
    schema = RowSchema(
        prompt_key=data_config.prompt_key,
        answer_key=data_config.answer_key,
        data_source_key=data_config.data_source_key,
        multiple_choice_sources=tuple(data_config.multiple_choice_sources),
    )
    loaded = load_problems(files, schema, on_bad_row=data_config.on_bad_row)
    prompt_set = build_prompts(loaded.problems, tokenizer, data_config.max_prompt_length, data_config.truncation)
    prompt_set.skipped_rows = loaded.skipped
    return prompt_set
