"""Prompt data: Parquet/JSONL (and Hugging Face datasets) loading with row validation, chat-template rendering, the prompt-length
limit, and a resumable per-epoch shuffling sampler."""
from clipo_nemo.data.problems import BadRowError, LoadedProblems, Problem, RowSchema, load_problems, problem_from_row, read_rows
from clipo_nemo.data.prompts import Prompt, PromptSet, build_prompts, load_prompt_set, render_prompt
from clipo_nemo.data.sampler import EpochSampler

__all__ = [
    "BadRowError",
    "EpochSampler",
    "LoadedProblems",
    "Problem",
    "Prompt",
    "PromptSet",
    "RowSchema",
    "build_prompts",
    "load_problems",
    "load_prompt_set",
    "problem_from_row",
    "read_rows",
    "render_prompt",
]
