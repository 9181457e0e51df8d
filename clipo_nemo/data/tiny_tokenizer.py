"""A word-level tokenizer for the tiny arithmetic task, built locally (nothing downloaded).

The vocabulary is exactly the task's alphabet: the special tokens, the words of the prompts of the
chosen operators (and of their perturbed wordings, when asked for), the numbers ``0..2*max_operand``
(``0..max_operand`` without ``+``) as single words, and every possible answer (``\\boxed{0}`` ..)
as one word each. The default (``+`` and ``-``, no perturbations) is the 32-token vocabulary of
earlier versions, ids included. One-token answers are what makes the task learnable from scratch by RL (see
:mod:`clipo_nemo.data.tiny_task`). Whitespace is not encoded; ``decode`` joins words with a space,
so a response decodes to e.g. ``\\boxed{7}`` which the math verifier reads directly.

The result is a ``transformers.PreTrainedTokenizerFast`` with a chat template, so the project's data
path (``apply_chat_template(..., add_generation_prompt=True)``) treats it like any Hugging Face
tokenizer. Save it with ``save_pretrained(dir)`` and load it with :func:`load_tiny_tokenizer`.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from clipo_nemo.data.tiny_task import ARITHMETIC_OPERATORS, TINY_INSTRUCTION, tiny_answer_range, tiny_template_texts

PAD, EOS, UNK, USER, ASSISTANT = "<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, EOS, UNK, USER, ASSISTANT)
MAX_VOCAB = 128

# A word is a whole \boxed{...} answer, a number, a run of letters, or one other visible character.
_WORD_PATTERN = r"\\boxed\{\d*\}|\d+|[A-Za-z']+|[^\sA-Za-z0-9']"

# Rendering: "<|user|> What is 3 + 4? Answer in \boxed{}. <|assistant|>" (+ " \boxed{7} <eos>" when
# an assistant turn is given). Any other role is an error rather than silently dropped.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}" + USER + " {{ message['content'] }} "
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT + " {{ message['content'] }} " + EOS + " "
    "{%- else -%}{{ raise_exception('tiny chat template: unsupported role ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated")]
    )


def _task_words(max_operand: int, operators: Sequence[str], perturbed: bool) -> List[str]:
    """Every word the task's prompts and answers can contain, in a fixed order."""
    def words(text: str) -> List[str]:
        return [w for w, _ in _pre_tokenizer().pre_tokenize_str(text)]

    template_words = words(f"What is ? {TINY_INSTRUCTION}") + list(ARITHMETIC_OPERATORS)
    template_words += [w for text in tiny_template_texts(operators, perturbed) for w in words(text)]
    answers = tiny_answer_range(max_operand, operators)
    return template_words + [str(n) for n in answers] + [f"\\boxed{{{n}}}" for n in answers]


def build_tiny_tokenizer(max_operand: int = 4, operators: Sequence[str] = ARITHMETIC_OPERATORS,
                         perturbed: bool = False) -> PreTrainedTokenizerFast:
    """Build the tokenizer for :func:`clipo_nemo.data.tiny_task.make_tiny_arith_splits` with the same
    ``max_operand``, ``operators`` and ``perturbed``.

    Raises ``ValueError`` when the vocabulary would exceed :data:`MAX_VOCAB` tokens.
    """
    words = list(SPECIAL_TOKENS) + list(dict.fromkeys(_task_words(max_operand, operators, perturbed)))
    if len(words) > MAX_VOCAB:
        raise ValueError(
            f"max_operand={max_operand} with operators {tuple(operators)} needs {len(words)} tokens; "
            f"the tiny tokenizer allows {MAX_VOCAB}"
        )
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNK))
    core.pre_tokenizer = _pre_tokenizer()
    core.add_special_tokens(list(SPECIAL_TOKENS))  # already in the vocabulary: keeps ids, splits them out of text
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=256,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_task_tokenizer(task) -> PreTrainedTokenizerFast:
    """The tiny tokenizer of the run's ``task.*`` config section (``TinyTaskConfig``)."""
    return build_tiny_tokenizer(task.max_operand, tuple(task.operators), task.perturbed)


def load_tiny_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer written by ``build_tiny_tokenizer(...).save_pretrained(path)``."""
    if not (Path(path) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}: save one with build_tiny_tokenizer().save_pretrained")
    return PreTrainedTokenizerFast.from_pretrained(str(path))
