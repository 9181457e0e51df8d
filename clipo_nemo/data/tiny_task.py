"""The embedded default's synthetic verifiable task: small number problems, answers in ``\\boxed{}``.

Rows have exactly the schema of the paper's Parquet files (``data_source``, ``prompt``, ``ability``,
``reward_model``, ``extra_info``), so the same loader, verifier and trainer run on them.

Why the task looks like this (it must be learnable *from scratch by RL* in minutes on a CPU):
a randomly initialised model samples nearly uniformly over its vocabulary, and the verifier pays only
for a correct answer inside ``\\boxed{}``. If the answer took several tokens (``\\boxed{``, digits,
``}``), the chance of a random hit would be about ``V**-3`` and RL would never see a reward. So the
task is paired with :mod:`clipo_nemo.data.tiny_tokenizer`, whose vocabulary holds every possible
answer as one word (``\\boxed{12}``): correctness is decided by a single sampled token, a random
policy is right a few percent of the time, and every correct sample is a clean policy-gradient signal.

Operators (``operators``, any non-empty subset of :data:`TINY_OPERATORS`):

- ``+`` and ``-`` (``What is 3 + 4?``; subtraction keeps ``a >= b``): answers ``0 .. 2 * max_operand``.
  A 2-layer model memorises these facts but does not generalise them to held-out pairs (a supervised
  probe with the same width, 1,000 steps on 80 of the 100 sums of 0..9, gets the held-out sums right
  only where the swapped pair was trained).
- ``max`` and ``min`` (``What is the larger of 3 and 7?`` / ``the smaller of``): a rule a tiny model
  does learn from part of the pairs (compare two numbers, copy one) and applies to held-out pairs;
  the embedded default uses these, so held-out Pass@1 measures learning a rule, not recall.
- ``chain`` (``What is 3 + 4 + 2?``, three operands): a response may write the intermediate sum
  before the answer (``7 \\boxed{9}``, a *derivation*) or answer directly (``\\boxed{9}``); only the
  boxed answer is scored. Every step-level fact (a + b, then s + c) occurs in the training triples,
  so a derivation can reach held-out triples, while a direct answer to one can only be recalled or
  guessed: correct responses differ in their reasoning path (the ``tiny_chain`` config, with a
  supervised warm start from :func:`chain_demonstration`). :func:`chain_response_form` names a
  response's path.

Held-out problems: all distinct problems are enumerated, shuffled with the seed, and a fraction goes
to the ``heldout`` split. With ``perturbed=True`` the ``heldout_perturbed`` split holds every held-out
problem three more times with the same numbers and answer and a changed surface, as the paper's
perturbed benchmarks (GSM-Symbolic/P1, MATH-Perturb) change a problem's wording but not its solution:

- ``reworded``: the question in another order (``3 + 4 is what?``, ``Of 3 and 7, what is the larger?``);
- ``distractor``: an irrelevant clause with a number in front (``Tom has 5 pens. What is ...``);
- ``units``: the operands become named quantities (``What is the larger of 3 cats and 7 cats?``).

The training split uses only the clean wording, so the perturbed words are never trained on. The same
arguments always give the same rows.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

TINY_DATA_SOURCE = "tiny/arith"
# Short on purpose: every prompt token costs a tiny model attention capacity and CPU time.
TINY_INSTRUCTION = "Answer in \\boxed{}."
TINY_OPERATORS = ("+", "-", "max", "min", "chain")
ARITHMETIC_OPERATORS = ("+", "-")  # the default: the tokenizer and rows of earlier versions
PERTURBATIONS = ("reworded", "distractor", "units")

# The question of each operator: clean (training and ``heldout``) and per perturbation. Fields:
# {a} {b} operands, {c} the distractor's number, {name} {things} its words, {unit} the quantities' name.
# ``chain``'s third operand is {e}.
CLEAN_TEMPLATES = {"+": "What is {a} + {b}?", "-": "What is {a} - {b}?",
                   "max": "What is the larger of {a} and {b}?", "min": "What is the smaller of {a} and {b}?",
                   "chain": "What is {a} + {b} + {e}?"}
REWORDED_TEMPLATES = {"+": "{a} + {b} is what?", "-": "{a} - {b} is what?",
                      "max": "Of {a} and {b}, what is the larger?", "min": "Of {a} and {b}, what is the smaller?",
                      "chain": "{a} + {b} + {e} is what?"}
UNITS_TEMPLATES = {"+": "What is {a} {unit} + {b} {unit}?", "-": "What is {a} {unit} - {b} {unit}?",
                   "max": "What is the larger of {a} {unit} and {b} {unit}?",
                   "min": "What is the smaller of {a} {unit} and {b} {unit}?",
                   "chain": "What is {a} {unit} + {b} {unit} + {e} {unit}?"}
DISTRACTOR_TEMPLATE = "{name} has {c} {things}."
DISTRACTOR_NAMES = ("Tom", "Sue")
DISTRACTOR_THINGS = ("pens", "books")
UNITS = ("cats", "coins")

Row = Dict[str, object]
TinyProblem = Tuple[int, str, int, int, int]  # (a, operator, b, e, answer); e (the third operand) is 0 but for chain


def tiny_answer_range(max_operand: int, operators: Sequence[str] = ARITHMETIC_OPERATORS) -> range:
    """Every answer (and ``chain`` intermediate) ``operators`` can have with operands in ``0..max_operand``:
    up to ``3 * max_operand`` with ``chain``, ``2 * max_operand`` with ``+``, else ``max_operand``."""
    return range(0, (3 if "chain" in operators else 2 if "+" in operators else 1) * max_operand + 1)


def tiny_template_texts(operators: Sequence[str], perturbed: bool) -> List[str]:
    """Every fixed text the prompts of ``operators`` can contain, numbers left out (the tokenizer's
    source of words), in a fixed order."""
    texts = [CLEAN_TEMPLATES[op] for op in operators]
    if perturbed:
        texts += [REWORDED_TEMPLATES[op] for op in operators] + [UNITS_TEMPLATES[op] for op in operators]
        texts += [DISTRACTOR_TEMPLATE.replace("{name}", name).replace("{things}", things)
                  for name in DISTRACTOR_NAMES for things in DISTRACTOR_THINGS]
    fields = {"{a}": "", "{b}": "", "{c}": "", "{e}": "", "{unit}": " ".join(UNITS)}
    out = []
    for text in texts:
        for field, value in fields.items():
            text = text.replace(field, value)
        out.append(text)
    return out


def _check_args(max_operand: int, operators: Sequence[str], val_fraction: float) -> None:
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    unknown = [op for op in operators if op not in TINY_OPERATORS]
    if not operators or unknown or len(set(operators)) != len(operators):
        raise ValueError(f"operators must be a non-empty subset of {TINY_OPERATORS} without repeats, "
                         f"got {tuple(operators)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")


def _answer(a: int, op: str, b: int, e: int) -> int:
    return {"+": a + b, "-": a - b, "max": max(a, b), "min": min(a, b), "chain": a + b + e}[op]


def _all_problems(max_operand: int, operators: Sequence[str]) -> List[TinyProblem]:
    """Every distinct problem as ``(a, op, b, e, answer)``, in a fixed order (``-`` only with ``a >= b``;
    ``e`` ranges over the operands for ``chain`` only)."""
    operands = range(max_operand + 1)
    return [(a, op, b, e, _answer(a, op, b, e)) for op in operators for a in operands for b in operands
            for e in (operands if op == "chain" else (0,)) if op != "-" or a >= b]


def _question(template: str, problem: TinyProblem, **fields) -> str:
    a, _, b, e, _ = problem
    return template.format(a=a, b=b, e=e, **fields)


def _row(question: str, answer: int, index: int, split: str) -> Row:
    return {
        "data_source": TINY_DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{question} {TINY_INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"ground_truth": str(answer), "style": "rule"},
        "extra_info": {"index": index, "split": split},
    }


def perturbed_questions(problem: TinyProblem, max_operand: int, rng: random.Random) -> Dict[str, str]:
    """The problem's question under each of :data:`PERTURBATIONS` (same numbers, same answer);
    the distractor's number and words and the unit are drawn from ``rng``."""
    op = problem[1]
    distractor = DISTRACTOR_TEMPLATE.format(name=rng.choice(DISTRACTOR_NAMES), c=rng.randint(0, max_operand),
                                            things=rng.choice(DISTRACTOR_THINGS))
    return {"reworded": _question(REWORDED_TEMPLATES[op], problem),
            "distractor": f"{distractor} {_question(CLEAN_TEMPLATES[op], problem)}",
            "units": _question(UNITS_TEMPLATES[op], problem, unit=rng.choice(UNITS))}


def make_tiny_arith_splits(
    max_operand: int = 4,
    operators: Sequence[str] = ARITHMETIC_OPERATORS,
    val_fraction: float = 0.2,
    seed: int = 0,
    perturbed: bool = False,
) -> Dict[str, List[Row]]:
    """Generate the task's ``{"train": rows, "heldout": rows}`` (disjoint problems, deterministic in
    the seed), plus ``"heldout_perturbed"`` (every held-out problem once per perturbation, in the
    order of :data:`PERTURBATIONS`) when ``perturbed``.

    Each row is one problem in the paper's Parquet schema; ``extra_info.index`` counts rows within
    their split. At least one problem lands in each of train and heldout.
    """
    _check_args(max_operand, operators, val_fraction)
    problems = _all_problems(max_operand, operators)
    rng = random.Random(seed)
    rng.shuffle(problems)
    n_val = min(max(1, round(len(problems) * val_fraction)), len(problems) - 1)
    heldout, train = problems[:n_val], problems[n_val:]
    splits = {
        "train": [_row(_question(CLEAN_TEMPLATES[p[1]], p), p[4], i, "train") for i, p in enumerate(train)],
        "heldout": [_row(_question(CLEAN_TEMPLATES[p[1]], p), p[4], i, "heldout") for i, p in enumerate(heldout)],
    }
    if perturbed:
        questions = [(q, problem[4]) for problem in heldout
                     for q in perturbed_questions(problem, max_operand, rng).values()]
        splits["heldout_perturbed"] = [_row(q, ans, i, "heldout_perturbed") for i, (q, ans) in enumerate(questions)]
    return splits


def _paper_parquet_schema():
    """The Arrow schema of the paper's files (column order and struct field order included)."""
    import pyarrow as pa

    return pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
    ])


def write_tiny_arith_parquet(out_dir: str | Path, **task_args) -> Dict[str, Path]:
    """Write :func:`make_tiny_arith_splits` rows to ``out_dir/<split>.parquet``; returns the paths by
    split. The file stems name the benchmarks in validation metrics (``val/heldout/pass@1``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in make_tiny_arith_splits(**task_args).items():
        paths[split] = out / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=_paper_parquet_schema()), paths[split])
    return paths


# --------------------------------------------------------------------------------------------------
# ``chain``: reasoning paths
# --------------------------------------------------------------------------------------------------
CHAIN_FORMS = ("derivation", "inconsistent", "direct", "other")
# "a + b + e" in any wording of the task (units between the numbers; a distractor's number has no "+").
_CHAIN_OPERANDS = re.compile(r"(\d+)(?: [A-Za-z]+)? \+ (\d+)(?: [A-Za-z]+)? \+ (\d+)")
_CHAIN_RESPONSE = re.compile(r"^\s*(?:(\d+)\s*)?\\boxed\{(\d+)\}\s*$")


def chain_operands(question: str) -> Tuple[int, int, int]:
    """(a, b, e) of a ``chain`` question in any of its wordings; ValueError when it has none."""
    match = _CHAIN_OPERANDS.search(question)
    if match is None:
        raise ValueError(f"not a chain question: {question!r}")
    a, b, e = (int(x) for x in match.groups())
    return a, b, e


def chain_response_form(question: str, response: str) -> str:
    """The reasoning path of a response to a ``chain`` question (one of :data:`CHAIN_FORMS`):
    ``derivation`` (``s \\boxed{t}`` with s = a + b), ``inconsistent`` (an intermediate s != a + b),
    ``direct`` (``\\boxed{t}`` alone) or ``other`` (anything else). The answer's correctness is the
    verifier's business, not this function's."""
    match = _CHAIN_RESPONSE.match(response)
    if match is None:
        return "other"
    if match.group(1) is None:
        return "direct"
    a, b, _ = chain_operands(question)
    return "derivation" if int(match.group(1)) == a + b else "inconsistent"


def chain_demonstration(question: str, rng: random.Random, mix: Sequence[float], recall: float,
                        answers: range) -> str:
    """One supervised warm-start response to a ``chain`` question: with the probabilities ``mix`` =
    (derivation, direct, inconsistent) a correct derivation ``s \\boxed{t}``; a direct ``\\boxed{t}``
    that is the right answer with probability ``recall`` and otherwise a uniform guess from ``answers``;
    or a derivation with a wrong intermediate and the right answer (right answer, wrong process)."""
    a, b, e = chain_operands(question)
    form = rng.choices(("derivation", "direct", "inconsistent"), weights=mix)[0]
    if form == "derivation":
        return f"{a + b} \\boxed{{{a + b + e}}}"
    if form == "direct":
        answer = a + b + e if rng.random() < recall else rng.choice(answers)
        return f"\\boxed{{{answer}}}"
    wrong = rng.choice([s for s in answers if s != a + b])
    return f"{wrong} \\boxed{{{a + b + e}}}"
