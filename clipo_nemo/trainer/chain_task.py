"""The ``tiny_chain`` task's trainer pieces: its supervised warm start and its mechanism metrics.

Warm start: before any RL, a few teacher-forced steps on
demonstrations that mix reasoning paths (correct derivations, direct answers that are recalled or
guessed, derivations with a wrong intermediate and the right answer), so that, as the paper's
instruct models do, the policy starts with several ways of reaching an answer and correct answers
reached by a wrong process exist for CLIPO to tell apart.

Every rank builds the same global batch of demonstrations per step (seeded by ``data.seed``) and
trains on its data-parallel share; the reference policy is made the warm-started policy afterwards
(the KL term anchors RL to the warm start, as it anchors the paper's runs to the instruct model).

Mechanism metrics (every step, over all DP ranks): the share of responses of each reasoning path
(``chain/derivation_frac``, ``chain/direct_frac``, ...), the share that is correct but reached by a
wrong process (``chain/correct_inconsistent_frac``: a wrong intermediate, or a direct answer), and the
mean contrastive reward of correct derivations against that of correct answers by another path
(``chain/rc_correct_derivation``, ``chain/rc_correct_shortcut``): CLIPO can only favour the derivation
path if the first is higher, which the warm-up steps (policy frozen, head training) show before any RL.
"""
from __future__ import annotations

import random
from typing import Dict, List, Sequence

import torch

from clipo_nemo.config import ClipoConfig
from clipo_nemo.data.prompts import Prompt
from clipo_nemo.data.tiny_task import CHAIN_FORMS, chain_demonstration, chain_response_form, tiny_answer_range
from clipo_nemo.models.forward import PolicyBatch
from clipo_nemo.parallel.gather import all_reduce_values
from clipo_nemo.trainer.actor import Actor
from clipo_nemo.trainer.experience import Rollouts, build_experience


def _dp_group():
    """The data-parallel group (None without a process group: the sums are then this process's)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group() if dist.is_initialized() else None


def question_of(prompt: Prompt) -> str:
    """The text of a prompt's (last) user message."""
    return prompt.problem.messages[-1]["content"]


def warm_start(actor: Actor, prompts: Sequence[Prompt], tokenizer, cfg: ClipoConfig, dp_rank: int,
               dp_size: int) -> str:
    """Run ``task.warm_start_steps`` supervised steps of ``trainer.prompts_per_step x rollout.n``
    demonstrations each (the RL batch's size) with the policy optimizer at ``task.warm_start_lr`` (its
    moments carry over into RL), then sync the reference. Returns a line for the log."""
    task = cfg.task
    rng = random.Random(cfg.data.seed * 1_000_003 + 17)
    answers = tiny_answer_range(task.max_operand, tuple(task.operators))
    batch_size = cfg.trainer.prompts_per_step * cfg.rollout.n
    per_rank = batch_size // dp_size
    losses = []
    rl_lrs = [group["lr"] for group in actor.optimizer.param_groups]
    for group in actor.optimizer.param_groups:  # the warm start's own step size; RL's is restored after it
        group["lr"] = task.warm_start_lr
    for _ in range(task.warm_start_steps):
        chosen = [rng.choice(prompts) for _ in range(batch_size)]
        demos = [chain_demonstration(question_of(p), rng, task.warm_start_mix, task.warm_start_recall, answers)
                 for p in chosen]
        mine = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        rollouts = Rollouts([list(chosen[i].token_ids) for i in mine],
                            [tokenizer(demos[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                             for i in mine], ["stop"] * per_rank)
        exp, _ = build_experience(rollouts, torch.zeros(per_rank), 0, 0, 1, tokenizer.pad_token_id,
                                  tokenizer.eos_token_id)
        losses.append(actor.supervised_step(PolicyBatch(exp.tokens, exp.response_mask))["sft_loss"])
    for group, lr in zip(actor.optimizer.param_groups, rl_lrs):
        group["lr"] = lr
    actor.sync_reference()
    return (f"supervised warm start: {task.warm_start_steps} steps of {batch_size} demonstrations at lr {task.warm_start_lr} "
            f"(mix derivation/direct/inconsistent {list(task.warm_start_mix)}, recall {task.warm_start_recall}); "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def chain_metrics(questions: Sequence[str], texts: Sequence[str], correct: torch.Tensor,
                  contrastive_rewards: torch.Tensor) -> Dict[str, float]:
    """The mechanism metrics of this step (see module doc) from this rank's responses: ``questions``
    and decoded ``texts`` per response, ``correct`` [b] and ``contrastive_rewards`` [b]. Collective
    (sums over the data-parallel group). A mean over no response is left out."""
    forms = [chain_response_form(q, t) for q, t in zip(questions, texts)]
    correct = [bool(c) for c in correct.tolist()]
    rewards = contrastive_rewards.tolist()
    shortcut = [c and f in ("inconsistent", "direct") for f, c in zip(forms, correct)]
    derivation = [c and f == "derivation" for f, c in zip(forms, correct)]
    sums = [float(len(forms))] + [float(forms.count(form)) for form in CHAIN_FORMS] + [
        float(sum(shortcut)), float(sum(derivation)), sum(r for r, d in zip(rewards, derivation) if d),
        sum(r for r, s in zip(rewards, shortcut) if s)]
    total, *counts, n_shortcut, n_derivation, rc_derivation, rc_shortcut = all_reduce_values(sums, _dp_group())
    metrics = {f"chain/{form}_frac": count / max(total, 1.0) for form, count in zip(CHAIN_FORMS, counts)}
    metrics["chain/correct_inconsistent_frac"] = n_shortcut / max(total, 1.0)
    if n_derivation:
        metrics["chain/rc_correct_derivation"] = rc_derivation / n_derivation
    if n_shortcut:
        metrics["chain/rc_correct_shortcut"] = rc_shortcut / n_shortcut
    return metrics


def recording(generate_fn, record: Dict[str, List[str]]):
    """``generate_fn`` that also keeps each prompt text's samples in ``record`` (for
    :func:`chain_validation_metrics`)."""
    def wrapped(texts, k, temperature, top_p):
        generated = generate_fn(texts, k, temperature, top_p)
        record.update(zip(texts, generated))
        return generated

    return wrapped


def chain_validation_metrics(benchmarks: Sequence[str], prompt_sets: Dict[str, List[Prompt]],
                             record: Dict[str, List[str]], results) -> Dict[str, float]:
    """Per benchmark, over all DP ranks: the share of each reasoning path among the samples and the
    Pass@1 within each path (``val/<benchmark>/chain/derivation_frac``, ``.../pass@1_derivation``, ...;
    percent, as Pass@1 elsewhere). ``benchmarks``: every benchmark's name (the same on every rank);
    ``prompt_sets``: this rank's prompts by benchmark; ``record``: samples by prompt text; ``results``: this rank's ProblemResults.
    A Pass@1 within a path that no sample took is left out. Collective."""
    verdicts = {(r.benchmark, r.index): r.correct for r in results}
    paths = ("derivation", "direct", "inconsistent")
    sums = []
    for name in benchmarks:
        counts = {path: [0.0, 0.0] for path in paths + ("other",)}
        for prompt in prompt_sets.get(name, []):
            for text, correct in zip(record[prompt.text], verdicts[(name, prompt.problem.row)]):
                form = chain_response_form(question_of(prompt), text)
                counts[form][0] += 1
                counts[form][1] += float(correct)
        sums += [value for form in counts for value in counts[form]]
    sums = all_reduce_values(sums, _dp_group())
    metrics, per_benchmark = {}, 2 * (len(paths) + 1)
    for i, name in enumerate(benchmarks):
        values = sums[i * per_benchmark:(i + 1) * per_benchmark]
        total = sum(values[0::2])
        for j, path in enumerate(paths + ("other",)):
            taken, right = values[2 * j], values[2 * j + 1]
            metrics[f"val/{name}/chain/{path}_frac"] = 100.0 * taken / max(total, 1.0)
            if taken and path != "other":
                metrics[f"val/{name}/chain/pass@1_{path}"] = 100.0 * right / taken
    return metrics
