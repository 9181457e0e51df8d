"""From rollouts to experience: the engine's responses (``Rollouts``), their verdicts, and the padded
token batch the learning step reads (``Experience``), plus the engine's log-probs laid out like it and
their mismatch against the trainer's. :mod:`clipo_nemo.trainer.loop` calls these each step;
``engine_generate_fn`` also serves the evaluation tool.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from clipo_nemo.data.prompts import Prompt
from clipo_nemo.parallel.gather import all_reduce_values
from clipo_nemo.trainer.step import Experience

@dataclass
class Rollouts:
    """Responses of one rank: ``n`` consecutive responses per prompt."""

    prompt_ids: List[List[int]]  # per response, its prompt's tokens
    response_ids: List[List[int]]
    finish_reasons: List[str]
    logprobs: Optional[List[List[float]]] = None  # per response, the engine's log-prob of each token (trtllm)


def generate(engine, prompt_ids: Sequence[Sequence[int]], params, seeds: Sequence[int]) -> Rollouts:
    """``params.n`` responses per prompt from the rollout engine, seeded per prompt."""
    out = engine.generate([list(p) for p in prompt_ids], params, list(seeds))
    rows = range(len(out.finish_reasons))
    logprobs = getattr(out, "logprobs", None)
    return Rollouts([list(p) for p in prompt_ids for _ in range(params.n)], [out.response(row) for row in rows],
                    list(out.finish_reasons),
                    None if logprobs is None else [logprobs[row, : int(out.lengths[row])].tolist() for row in rows])


@dataclass
class SampledGroup:
    """One prompt's ``n`` responses with their verdicts."""

    prompt: Prompt
    responses: List[List[int]]
    finish_reasons: List[str]
    scores: torch.Tensor  # [n]
    reasons: List[str]
    logprobs: Optional[List[List[float]]] = None  # the engine's token log-probs (Rollouts.logprobs)


def engine_generate_fn(engine, tokenizer, prompts: Sequence[Prompt], params, max_new_tokens: int, base_seed: int):
    """An evaluation ``generate_fn(texts, k, temperature, top_p)`` over ``prompts`` (looked up by
    their rendered text) that samples with the rollout engine, seeded per prompt position."""
    ids_by_text = {p.text: list(p.token_ids) for p in prompts}

    def generate_fn(texts, k, temperature, top_p):
        eval_params = replace(params, n=k, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens)
        rollouts = generate(engine, [ids_by_text[t] for t in texts], eval_params,
                            [base_seed + i for i in range(len(texts))])
        decoded = tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
        return [decoded[i * k:(i + 1) * k] for i in range(len(texts))]

    return generate_fn


def verify(pool, tokenizer, prompts: Sequence[Prompt], rollouts: Rollouts, n: int):
    """Scores [b] (1.0 / 0.0) and reason codes, in rollout order."""
    from clipo_nemo.verifiers.registry import VerifyRequest

    texts = tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
    requests = [VerifyRequest(p.problem.verifier, text, p.problem.reference, p.problem.choices)
                for p, start in zip(prompts, range(0, len(texts), n)) for text in texts[start:start + n]]
    results = pool.verify(requests)
    return torch.tensor([r.reward for r in results], dtype=torch.float32), [r.reason for r in results]


def build_experience(rollouts: Rollouts, scores: torch.Tensor, first_group: int, first_index: int, n: int,
                     pad_id: int, eos_id: int) -> (Experience, int):
    """Right-padded prompt + response tokens with the response mask. A response with no tokens is
    stood in for by a lone EOS (the model ended at once), so every row has a token to learn from.
    Returns the experience and the number of empty responses."""
    rows, masks, empty = [], [], 0
    for prompt, response in zip(rollouts.prompt_ids, rollouts.response_ids):
        if not response:
            response, empty = [eos_id], empty + 1
        rows.append(prompt + response)
        masks.append([False] * len(prompt) + [True] * len(response))
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(m)] = torch.tensor(m)
    count = len(rows)
    group_ids = first_group + torch.arange(count) // n
    return Experience(tokens, mask, scores, group_ids, first_index + torch.arange(count)), empty


def rollout_logprobs(groups: Sequence[SampledGroup], exp: Experience) -> Optional[torch.Tensor]:
    """The engine's token log-probs laid out like ``exp.tokens`` [b, S] (NaN where it gave none), or
    None for engines that return none."""
    if not groups or any(g.logprobs is None for g in groups):
        return None
    generated = torch.full(exp.tokens.shape, float("nan"))
    first = exp.response_mask.int().argmax(-1)  # where each response starts
    for row, logprobs in enumerate(lp for g in groups for lp in g.logprobs):
        generated[row, int(first[row]):int(first[row]) + len(logprobs)] = torch.tensor(logprobs)
    return generated


def logprob_mismatch_metrics(exp: Experience, train_logprobs) -> Dict[str, float]:
    """Mean and max over all ranks of ``|logp_train - logp_gen|`` on the sampled tokens;
    ``train_logprobs`` [b, S] (None on stages without outputs)."""
    from clipo_nemo.algorithms.policy_losses import logprob_mismatch

    total, count, peak = (0.0, 0.0, 0.0) if train_logprobs is None else logprob_mismatch(
        train_logprobs.cpu(), exp.rollout_logprobs, exp.response_mask)
    total, count = all_reduce_values([total, count])
    return {"rollout/logprob_mismatch_mean": total / max(count, 1.0),
            "rollout/logprob_mismatch_max": all_reduce_values([peak], op=dist.ReduceOp.MAX)[0]}
