"""Proof that a parallel layout computes what a single process computes, for one CLIPO step.

Every layout starts from the same full weights and the same global batch of responses, samples
responses to fixed prompts with the configured rollout engine (same seeds: ``generated_tokens``
must be identical, token for token, on every rank), runs
:func:`clipo_nemo.trainer.step.learn_from_experience` once, and reports per-response quantities
(keyed by global batch position) plus the updated weights. :func:`compare` gives the max absolute
difference of each quantity against the single-process run. ``tools/check_parallel_equivalence.py``
is the command-line front end; the tests call the same functions.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from clipo_nemo.algorithms.checks import nan_max
from clipo_nemo.config import ClipoConfig
from clipo_nemo.parallel.launcher import run_distributed


@dataclass(frozen=True)
class Layout:
    """A parallel layout: sizes, how responses are dealt to DP ranks, the head's TP mode."""

    name: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    split_groups: bool = False  # deal responses to DP ranks interleaved, cutting groups across ranks
    head_tp_mode: str = "replicated"

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


SINGLE = Layout("single")
DEFAULT_LAYOUTS = [
    Layout("tp2", tp=2),
    Layout("pp2", pp=2),
    Layout("tp2-pp2", tp=2, pp=2),
    Layout("dp2", dp=2),
    Layout("dp2-split-groups", dp=2, split_groups=True),
    Layout("tp2-dp2", tp=2, dp=2),
    Layout("tp2-head-column", tp=2, head_tp_mode="column"),
]


def parse_layout(spec: str) -> Layout:
    """``tp2``-style names from DEFAULT_LAYOUTS, or ``tp=2,pp=2,dp=1[,split][,column]``."""
    named = {layout.name: layout for layout in DEFAULT_LAYOUTS + [SINGLE]}
    if spec in named:
        return named[spec]
    sizes, flags = {"tp": 1, "pp": 1, "dp": 1}, set()
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key in sizes and value.isdigit():
            sizes[key] = int(value)
        elif part in ("split", "column"):
            flags.add(part)
        else:
            raise ValueError(f"bad layout {spec!r}: use a name ({', '.join(named)}) or tp=N,pp=N,dp=N[,split][,column]")
    return Layout(spec, **sizes, split_groups="split" in flags, head_tp_mode="column" if "column" in flags else "replicated")


def tiny_check_config() -> ClipoConfig:
    """A tiny fp32 model and optimizer settings that do not amplify rounding (SGD, no decay)."""
    cfg = ClipoConfig()
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.ffn_hidden_size = 4, 64, 128
    cfg.model.num_attention_heads, cfg.model.num_query_groups, cfg.model.vocab_size = 4, 2, 128
    cfg.model.max_position_embeddings = 64
    cfg.contrastive.head.dim = 16
    cfg.contrastive.temperature = 0.1
    cfg.algorithm.kl_loss_coef = 0.05
    cfg.actor.optimizer, cfg.actor.lr, cfg.actor.weight_decay = "sgd", 0.05, 0.0
    cfg.actor.use_distributed_optimizer = False  # megatron's distributed optimizer is Adam-only
    cfg.actor.ppo_epochs, cfg.actor.num_mini_batches = 1, 1  # one SGD step: its gradient is readable
    cfg.parallel.micro_batch_size = 2
    cfg.rollout.max_new_tokens = 12
    return cfg


def make_global_batch(cfg: ClipoConfig, num_groups: int = 4, group_size: int = 4, seq_len: int = 20, seed: int = 0):
    """A fixed global batch: prompt + response tokens with varied lengths, 0/1 scores, group ids."""
    g = torch.Generator().manual_seed(seed)
    batch = num_groups * group_size
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq_len), generator=g)
    prompt_len = torch.randint(3, 8, (batch,), generator=g)
    response_len = torch.randint(1, seq_len - 8, (batch,), generator=g)
    positions = torch.arange(seq_len)
    response_mask = (positions >= prompt_len[:, None]) & (positions < (prompt_len + response_len)[:, None])
    scores = (torch.rand(batch, generator=g) < 0.5).float()
    scores[::group_size] = 1.0  # every group has a correct response ...
    scores[1::group_size] = 1.0  # ... and a positive pair, so the contrastive loss is exercised
    group_ids = torch.arange(num_groups).repeat_interleave(group_size)
    return tokens, response_mask, scores, group_ids


GENERATION_SAMPLES = 4  # responses per prompt in the generation check


def generation_prompts(cfg: ClipoConfig, count: int = 3, seed: int = 5) -> List[List[int]]:
    """Fixed prompts of different lengths (4..9 tokens) for the generation check."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.model.vocab_size, (int(n),), generator=g).tolist()
            for n in torch.randint(4, 10, (count,), generator=g)]


def generate_tokens(model: torch.nn.Module, cfg: ClipoConfig) -> torch.Tensor:
    """Responses [prompts * GENERATION_SAMPLES, max_new_tokens] (long, -1 after each response's end)
    to :func:`generation_prompts` from ``cfg.rollout.engine`` on ``model`` (every rank calls it),
    seeded per prompt; the tiny task's tokenizer supplies EOS and padding ids."""
    from dataclasses import replace

    from clipo_nemo.data.tiny_tokenizer import build_tiny_tokenizer
    from clipo_nemo.rollout import GenerationParams, build_rollout_engine

    engine = build_rollout_engine(cfg.rollout, model=model, tokenizer=build_tiny_tokenizer(), cfg=cfg)
    prompts = generation_prompts(cfg)
    params = replace(GenerationParams.from_config(cfg.rollout), n=GENERATION_SAMPLES)
    out = engine.generate(prompts, params, seeds=[cfg.rollout.seed + i for i in range(len(prompts))])
    tokens = torch.full((len(out.lengths), params.max_new_tokens), -1, dtype=torch.long)
    for row in range(len(out.lengths)):
        response = out.response(row)
        tokens[row, : len(response)] = torch.tensor(response, dtype=torch.long)
    return tokens


def _dp_rows(layout: Layout, dp_rank: int, batch: int) -> torch.Tensor:
    if not layout.split_groups:
        return torch.arange(batch).chunk(layout.dp)[dp_rank]
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(1))
    return order.chunk(layout.dp)[dp_rank]


def run_layout(rank: int, world_size: int, cfg: ClipoConfig, layout: Layout, init_path: str) -> Dict:
    """One rank of one layout (spawned by :func:`run`). Returns per-response tensors keyed by
    global batch position from the ranks that own them, and the full updated weights from rank 0.

    The single-process run creates the initial weights (seeded init) and saves them to
    ``init_path``; every other layout loads them from there."""
    from megatron.core import parallel_state

    from clipo_nemo.models.forward import PolicyBatch
    from clipo_nemo.models.sharding import gather_full_state_dict, load_full_state_dict
    from clipo_nemo.parallel.gather import all_gather_rows
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state, validate_layout
    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.trainer.step import ClipoHead, Experience, learn_from_experience

    cfg = copy.deepcopy(cfg)
    cfg.parallel.tensor_parallel_size, cfg.parallel.pipeline_parallel_size = layout.tp, layout.pp
    cfg.contrastive.head.tp_mode = layout.head_tp_mode
    tokens, response_mask, scores, group_ids = make_global_batch(cfg)
    validate_layout(world_size, cfg.model, cfg.parallel, batch_size=len(scores))
    init_parallel_state(cfg.parallel)
    try:
        actor = Actor.build(cfg)
        clipo = ClipoHead.build(cfg)
        if layout == SINGLE:
            initial = {"policy": gather_full_state_dict(actor.module, cfg.model.vocab_size),
                       "head": clipo.head.full_state_dict()}
            torch.save(initial, init_path)
        initial = torch.load(init_path, weights_only=True)
        load_full_state_dict(actor.module, initial["policy"], cfg.model.vocab_size)
        actor.sync_reference()
        clipo.head.load_full_state_dict(initial["head"])
        generated = generate_tokens(actor.module, cfg)
        rows = _dp_rows(layout, parallel_state.get_data_parallel_rank(), len(scores))
        exp = Experience(tokens[rows], response_mask[rows], scores[rows], group_ids[rows], rows)

        # The embeddings before the step, for the report (an extra forward only this check pays).
        old = actor.old_outputs(PolicyBatch(exp.tokens, exp.response_mask))
        embeddings = None
        if old is not None:
            with torch.no_grad():
                z = clipo.head(old.pooled_hidden)
                if layout.head_tp_mode == "column":
                    z = all_gather_rows(z.T.contiguous(), parallel_state.get_tensor_model_parallel_group()).T
                embeddings = torch.nn.functional.normalize(z, dim=-1)

        out = learn_from_experience(actor, clipo, exp, cfg, step=0)
        weights = gather_full_state_dict(actor.module, cfg.model.vocab_size)
        head_weights = clipo.head.full_state_dict()
        owner = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        result = {"metrics": out.metrics, "head_weights": head_weights,  # the head lives on the last stage
                  "generated_tokens": generated}
        if owner:
            result["rows"] = {
                "index": rows, "old_logprobs": out.old_logprobs, "pooled_hidden": out.pooled_hidden,
                "embeddings": embeddings, "contrastive_loss": out.contrastive_loss,
                "contrastive_rewards": out.contrastive_rewards, "advantages": out.advantages,
            }
        if rank == 0:
            result.update(weights=weights, initial=initial)
        return result
    finally:
        destroy_parallel_state()


def _assemble(results: List[Dict], lr: float) -> Dict[str, torch.Tensor]:
    """Per-response tensors from every owning rank, put back in global batch order, plus weights,
    the gradients of the one SGD step (``(w_before - w_after) / lr``, clipping included) and the
    generated tokens (every rank's must be the same)."""
    pieces = [r["rows"] for r in results if "rows" in r]
    batch = sum(len(p["index"]) for p in pieces)
    out: Dict[str, torch.Tensor] = {}
    for key in pieces[0]:
        if key == "index":
            continue
        first = pieces[0][key]
        full = first.new_zeros(batch, *first.shape[1:])
        for p in pieces:
            full[p["index"]] = p[key]
        out[key] = full
    generated = [r["generated_tokens"] for r in results]
    differing = [rank for rank, tokens in enumerate(generated) if not torch.equal(tokens, generated[0])]
    if differing:
        raise RuntimeError(f"ranks {differing} generated other tokens than rank 0 of the same layout")
    out["generated_tokens"] = generated[0]
    out["policy_loss"] = torch.tensor(results[0]["metrics"]["pg_loss"])
    out["grad_norm"] = torch.tensor(results[0]["metrics"]["grad_norm"])
    initial = results[0]["initial"]
    for name, tensor in results[0]["weights"].items():
        out[f"weights/{name}"] = tensor
        out[f"gradients/{name}"] = (initial["policy"][name] - tensor) / lr
    for name, tensor in next(r for r in results if "rows" in r)["head_weights"].items():
        out[f"head/{name}"] = tensor
    return out


def run(cfg: ClipoConfig, layouts: List[Layout], work_dir: str, timeout_s: float = 600.0,
        progress=print) -> Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, torch.Tensor]]]:
    """Run the single process and every layout; return (single, {layout name: quantities})."""
    if cfg.actor.optimizer != "sgd" or cfg.actor.weight_decay != 0 or cfg.actor.ppo_epochs * cfg.actor.num_mini_batches != 1:
        raise ValueError("the equivalence check reads gradients off one plain SGD step: use actor.optimizer=sgd, "
                         "actor.weight_decay=0, actor.ppo_epochs=1, actor.num_mini_batches=1")
    init_path = os.path.join(work_dir, "initial.pt")
    progress("running: single process")
    single = _assemble(run_distributed(run_layout, 1, args=(cfg, SINGLE, init_path), timeout_s=timeout_s), cfg.actor.lr)
    results = {}
    for layout in layouts:
        progress(f"running: {layout.name} ({layout.world_size} processes)")
        raw = run_distributed(run_layout, layout.world_size, args=(cfg, layout, init_path), timeout_s=timeout_s)
        results[layout.name] = _assemble(raw, cfg.actor.lr)
    return single, results


def compare(single: Dict[str, torch.Tensor], other: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Max |difference| per quantity; weights and head weights are reported as one number each.
    ``generated_tokens`` are compared exactly: its number is how many token positions differ."""
    diffs: Dict[str, float] = {}
    for key, expected in single.items():
        group = key.split("/")[0] if "/" in key else key
        if key == "generated_tokens":
            diff = float((other[key] != expected).sum()) if other[key].shape == expected.shape else float(expected.numel())
        else:
            diff = (other[key].double() - expected.double()).abs().max().item() if expected.numel() else 0.0
        diffs[group] = nan_max([diff], diffs.get(group, 0.0))
    return diffs
