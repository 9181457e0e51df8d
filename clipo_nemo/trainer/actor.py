"""The GRPO actor on megatron-core: DDP-wrapped policy, optimizer, old/ref passes and the PPO update.

Data parallel: each DP rank holds its share of the responses. Losses are normalised by counts taken
over the whole mini-batch on all DP ranks (``LossNormalizer``), then multiplied by the number of
micro-batches and the DP size to undo megatron's per-micro-batch averaging and DDP's gradient
averaging: the summed gradient is then exactly that of the mini-batch loss a single process sees.
Micro-batches are ``parallel.micro_batch_size`` rows or, with ``parallel.max_tokens_per_micro_batch``,
length-sorted rows packed by token budget (their count then differs between DP ranks: each rank
undoes its own); ``actor/padding_frac`` reports the padding computed.

Optimizer: on GPU megatron's own (distributed optimizer, fp32 main grads, its grad clipping); on CPU,
where megatron's optimizers assert CUDA tensors, ``torch.optim`` on the DDP main grads with a grad
norm computed over the model-parallel group (TP duplicates and shared weights counted once).
``torch.optim`` steps the parameters themselves: a bf16 model on CPU has no fp32 master copy (updates
far below bf16's resolution are lost), so CPU bf16 checks that bf16 runs, while real bf16 training
is the GPU path with megatron's fp32 main parameters.

Reference policy (KL loss on): built like the policy, in ``model.params_dtype`` (a bf16 policy has a
bf16 reference, never an fp32 copy); with ``actor.reference_offload`` its weights stay in CPU memory
(pinned on GPU machines): each :meth:`Actor.reference_logprobs` copies them to the GPU once and drops
that copy afterwards, never copying back (the CPU tensors are the source of truth).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from clipo_nemo.algorithms.policy_losses import (
    POLICY_LOSSES, LossNormalizer, PolicyLossConfig, aggregate_loss, kl_penalty)
from clipo_nemo.config import ClipoConfig
from clipo_nemo.models.forward import (
    MicroBatchPlan, PolicyBatch, PolicyOutputs, compute_policy_outputs, forward_backward_policy)
from clipo_nemo.models.policy import build_policy_model, compute_device, move_module
from clipo_nemo.parallel.gather import all_reduce_values, broadcast_object


def wrap_ddp(model: torch.nn.Module, use_distributed_optimizer: bool) -> torch.nn.Module:
    """megatron-core ``DistributedDataParallel`` around ``model`` (fp32 grad buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=use_distributed_optimizer)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(model: torch.nn.Module, cfg: ClipoConfig):
    """megatron's optimizer on GPU; ``torch.optim`` AdamW (or SGD, for exact layout checks) on CPU."""
    actor = cfg.actor
    if torch.cuda.is_available():
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        opt_cfg = OptimizerConfig(
            optimizer="adam" if actor.optimizer == "adamw" else "sgd", lr=actor.lr, weight_decay=actor.weight_decay,
            adam_beta1=actor.adam_beta1, adam_beta2=actor.adam_beta2, adam_eps=actor.adam_eps,
            clip_grad=actor.clip_grad, bf16=cfg.model.params_dtype == "bfloat16",
            fp16=cfg.model.params_dtype == "float16", params_dtype=getattr(torch, cfg.model.params_dtype),
            use_distributed_optimizer=actor.use_distributed_optimizer)
        return get_megatron_optimizer(opt_cfg, [model])
    params = [p for p in model.parameters() if p.requires_grad]
    if actor.optimizer == "sgd":
        return torch.optim.SGD(params, lr=actor.lr, weight_decay=actor.weight_decay)
    return torch.optim.AdamW(params, lr=actor.lr, betas=(actor.adam_beta1, actor.adam_beta2), eps=actor.adam_eps,
                             weight_decay=actor.weight_decay)


def model_parallel_grad_norm(params: List[torch.nn.Parameter]) -> float:
    """L2 norm of ``.grad`` over the whole model: local squares, TP duplicates and PP-shared copies
    counted once (megatron's own filters), summed over the model-parallel group."""
    from megatron.core import parallel_state
    from megatron.core.transformer.module import param_is_not_shared
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    total = 0.0
    for p in params:
        if p.grad is not None and param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
            total += p.grad.double().square().sum().item()
    return math.sqrt(all_reduce_values([total], parallel_state.get_model_parallel_group())[0])


@dataclass
class Actor:
    """Policy (DDP-wrapped), its optimizer and an optional frozen reference policy."""

    cfg: ClipoConfig
    model: torch.nn.Module
    optimizer: object
    reference: Optional[torch.nn.Module] = None

    @classmethod
    def build(cls, cfg: ClipoConfig) -> "Actor":
        """Build on an initialised parallel state (see ``clipo_nemo.parallel.state``)."""
        from megatron.core.distributed import finalize_model_grads

        if cfg.algorithm.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"unknown algorithm.policy_loss {cfg.algorithm.policy_loss!r}; "
                             f"choose one of {sorted(POLICY_LOSSES)}")
        use_dist_opt = torch.cuda.is_available() and cfg.actor.use_distributed_optimizer
        model = wrap_ddp(build_policy_model(cfg.model, cfg.parallel), use_dist_opt)
        # The schedules call these: grad all-reduce over DP (and PP-shared embeddings) after backward.
        model.config.finalize_model_grads_func = finalize_model_grads
        model.config.no_sync_func = model.no_sync
        reference = None
        if cfg.algorithm.kl_loss_coef > 0:
            # Same builder, same model.params_dtype as the policy: a bf16 policy has a bf16 reference.
            reference = build_policy_model(cfg.model, cfg.parallel)
            reference.requires_grad_(False)
            if cfg.actor.reference_offload:
                move_module(reference, torch.device("cpu"), pin=torch.cuda.is_available())
        return cls(cfg, model, build_optimizer(model, cfg), reference)

    @property
    def module(self) -> torch.nn.Module:
        """The bare GPTModel inside DDP."""
        return self.model.module

    def sync_reference(self) -> None:
        """Make the reference policy a copy of the current policy (done once, before training)."""
        if self.reference is not None:
            self.reference.load_state_dict(self.module.state_dict())

    def _outputs(self, model, batch: PolicyBatch) -> Optional[PolicyOutputs]:
        with torch.no_grad():
            return compute_policy_outputs(model, batch, micro_batch_size=self.cfg.parallel.micro_batch_size,
                                          temperature=self.cfg.rollout.temperature, vocab_size=self.cfg.model.vocab_size,
                                          max_tokens_per_micro_batch=self.cfg.parallel.max_tokens_per_micro_batch,
                                          logprob_chunk_size=self.cfg.actor.logprob_chunk_size,
                                          pooling=self.cfg.contrastive.pooling)

    def old_outputs(self, batch: PolicyBatch) -> Optional[PolicyOutputs]:
        """One forward pass: old log-probs, entropy and pooled hidden states (last PP stage; else None)."""
        return self._outputs(self.model, batch)

    def reference_logprobs(self, batch: PolicyBatch) -> Optional[torch.Tensor]:
        """Log-probs of the frozen reference policy [b, S] (last PP stage), or None without KL."""
        if self.reference is None:
            return None
        with self._reference_on_device():
            out = self._outputs(self.reference, batch)
        return None if out is None else out.logprobs

    @contextlib.contextmanager
    def _reference_on_device(self) -> Iterator[None]:
        """With ``actor.reference_offload`` the reference's weights live in CPU memory (pinned on a GPU
        machine, moved there once in :meth:`build`) and are on the compute device only inside this
        block; otherwise they stay put."""
        if not self.cfg.actor.reference_offload:
            yield
            return
        with _device_copies_of_host_tensors(self.reference, compute_device()):
            yield

    # ----------------------------------------------------------------------------------------------
    def update(self, batch: PolicyBatch) -> Dict[str, float]:
        """PPO epochs over mini-batches of this rank's ``batch``.

        ``batch.extras`` must hold ``old_logprobs`` [b, S], ``advantages`` [b] and, with KL,
        ``ref_logprobs`` [b, S]. Every DP rank must hold the same number of responses.
        Returns metrics averaged over the optimizer steps (identical on every rank).
        """
        actor = self.cfg.actor
        num_mini = actor.num_mini_batches
        rows = batch.tokens.shape[0]
        if rows % num_mini != 0:
            raise ValueError(f"{rows} responses on this rank do not split into actor.num_mini_batches={num_mini}")
        history: Dict[str, List[float]] = {}
        for _ in range(actor.ppo_epochs):
            mini = rows // num_mini
            for start in range(0, rows, mini):
                mini_batch = PolicyBatch(batch.tokens[start:start + mini], batch.response_mask[start:start + mini],
                                         {k: v[start:start + mini] for k, v in batch.extras.items()})
                for key, value in self._optimizer_step(mini_batch).items():
                    history.setdefault(key, []).append(value)
        return {key: sum(values) / len(values) for key, values in history.items()}

    def _normalizer(self, mini_batch: PolicyBatch) -> LossNormalizer:
        """Token/sequence counts of the mini-batch over all DP ranks."""
        from megatron.core import parallel_state

        mask = mini_batch.response_mask
        counts = all_reduce_values([mask.sum().item(), (mask.sum(-1) > 0).sum().item()],
                                   parallel_state.get_data_parallel_group())
        max_len = self.cfg.rollout.max_new_tokens
        return LossNormalizer(num_tokens=float(counts[0]), num_seqs=float(counts[1]), max_response_length=max_len)

    def _optimizer_step(self, mini_batch: PolicyBatch) -> Dict[str, float]:
        from megatron.core import parallel_state

        algo, micro = self.cfg.algorithm, self.cfg.parallel.micro_batch_size
        max_tokens = self.cfg.parallel.max_tokens_per_micro_batch
        norm = self._normalizer(mini_batch)
        plan = mini_batch.micro_batch_plan(micro, max_tokens)
        # megatron divides each micro-batch loss by this rank's micro-batch count (with a token budget
        # it differs between DP ranks) and DDP averages over DP: both undone here, per rank.
        scale = len(plan.rows) * parallel_state.get_data_parallel_world_size()
        loss_cfg = PolicyLossConfig(algo.clip_ratio_low, algo.clip_ratio_high, algo.dual_clip_c, algo.loss_agg_mode)

        def loss_func(outputs: PolicyOutputs, mb: PolicyBatch):
            device = outputs.logprobs.device
            mask = mb.response_mask.to(device)
            extras = {k: v.to(device) for k, v in mb.extras.items()}
            advantages = extras["advantages"].to(outputs.logprobs.dtype).unsqueeze(-1).expand_as(outputs.logprobs)
            if "tis_weights" in extras:  # every loss is linear in a token's advantage: this weights its loss
                advantages = advantages * extras["tis_weights"].to(advantages.dtype)
            # The registry function directly, without compute_policy_loss's NaN refusal: a policy that
            # produced non-finite log-probs gets a non-finite grad norm, and the step is skipped.
            pg_loss, metrics = POLICY_LOSSES[algo.policy_loss](outputs.logprobs, extras["old_logprobs"],
                                                               advantages, mask, loss_cfg, norm)
            loss = pg_loss
            info = {"pg_loss": pg_loss.detach(), **metrics}
            if algo.kl_loss_coef > 0:
                kl = aggregate_loss(kl_penalty(outputs.logprobs, extras["ref_logprobs"], algo.kl_loss_type),
                                    mask, algo.loss_agg_mode, norm)
                loss = loss + algo.kl_loss_coef * kl
                info["kl_loss"] = kl.detach()
            if algo.entropy_coef > 0:
                entropy = aggregate_loss(outputs.entropy, mask, algo.loss_agg_mode, norm)
                loss = loss - algo.entropy_coef * entropy
                info["entropy"] = entropy.detach()
            return loss * scale, info

        return self._step_on(mini_batch, plan, loss_func, self.cfg.rollout.temperature)

    def supervised_step(self, batch: PolicyBatch) -> Dict[str, float]:
        """One optimizer step on the mean negative log-likelihood of the response tokens of every rank's
        ``batch`` (teacher forcing at temperature 1: the supervised warm start). Returns ``sft_loss``
        (over all DP ranks) and the step's metrics."""
        from megatron.core import parallel_state

        norm = self._normalizer(batch)
        plan = batch.micro_batch_plan(self.cfg.parallel.micro_batch_size, self.cfg.parallel.max_tokens_per_micro_batch)
        scale = len(plan.rows) * parallel_state.get_data_parallel_world_size()  # as in _optimizer_step

        def loss_func(outputs: PolicyOutputs, mb: PolicyBatch):
            nll = aggregate_loss(-outputs.logprobs, mb.response_mask.to(outputs.logprobs.device), "token-mean", norm)
            return nll * scale, {"sft_loss": nll.detach()}

        return self._step_on(batch, plan, loss_func, 1.0)

    def _step_on(self, batch: PolicyBatch, plan: MicroBatchPlan, loss_func, temperature: float) -> Dict[str, float]:
        """Forward-backward ``batch`` in ``plan``'s micro-batches with ``loss_func``, then clip and step."""
        self.model.zero_grad_buffer()  # DDP's main-grad buffers
        self.optimizer.zero_grad(set_to_none=True)  # torch's .grad (CPU) / megatron's fp32 copies (GPU)
        infos = forward_backward_policy(self.model, batch, micro_batch_size=self.cfg.parallel.micro_batch_size,
                                        temperature=temperature, vocab_size=self.cfg.model.vocab_size,
                                        loss_func=loss_func,
                                        max_tokens_per_micro_batch=self.cfg.parallel.max_tokens_per_micro_batch,
                                        logprob_chunk_size=self.cfg.actor.logprob_chunk_size, plan=plan)
        grad_norm, skipped = self._apply_gradients()
        return {**self._reduce_infos(infos), **_padding_metrics(plan), "grad_norm": grad_norm,
                "update_skipped": float(skipped)}

    def _apply_gradients(self):
        """Clip and step. Returns (grad norm, whether the update was skipped for a non-finite norm)."""
        if torch.cuda.is_available():
            ok, grad_norm, _ = self.optimizer.step()
            return float(grad_norm or 0.0), not ok
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = p.main_grad.to(p.dtype) if getattr(p, "main_grad", None) is not None else None
        grad_norm = model_parallel_grad_norm(params)
        if not math.isfinite(grad_norm):
            return grad_norm, True  # every rank sees the same all-reduced norm, so all skip together
        clip = self.cfg.actor.clip_grad
        if clip > 0 and grad_norm > clip:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(clip / (grad_norm + 1e-6))
        self.optimizer.step()
        return grad_norm, False

    def _reduce_infos(self, infos: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """Loss terms summed over micro-batches and DP ranks (they are pieces of one mini-batch loss);
        ratios (clip fractions, approx KL) averaged. Broadcast from the last PP stage to all ranks."""
        from megatron.core import parallel_state

        keys = sorted(infos[0]) if infos else []
        summed = {"pg_loss", "kl_loss", "entropy", "sft_loss"}
        values = [sum(float(i[k]) for i in infos) / (1 if k in summed else len(infos)) for k in keys]
        if keys:  # only the last PP stage has infos; its DP group reduces them
            dp_size = parallel_state.get_data_parallel_world_size()
            values = all_reduce_values(values, parallel_state.get_data_parallel_group())
            values = [v if k in summed else v / dp_size for k, v in zip(keys, values)]
        return broadcast_from_last_stage(dict(zip(keys, values)))


@contextlib.contextmanager
def _device_copies_of_host_tensors(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Inside the block ``module``'s parameters and buffers hold fresh copies on ``device`` of their
    CPU tensors; afterwards they hold those same CPU tensors again and the copies are dropped.

    For a frozen module whose CPU tensors are the source of truth (the offloaded reference): each
    use costs one host-to-device copy and no copy back. The CPU tensors are never replaced, so
    writes made between uses (``load_state_dict`` of a new reference) land in them. With ``device``
    = CPU nothing moves.
    """
    hosts = [(tensor, tensor.data) for tensor in itertools.chain(module.parameters(), module.buffers())]
    for tensor, host in hosts:
        tensor.data = host.to(device, non_blocking=True)
    try:
        yield
    finally:
        for tensor, host in hosts:
            tensor.data = host


def _padding_metrics(plan: MicroBatchPlan) -> Dict[str, float]:
    """Share of computed token positions that are padding, and rows over the token budget, over
    the mini-batch on all DP ranks (identical on every rank)."""
    from megatron.core import parallel_state

    computed, real, over = all_reduce_values([plan.computed_tokens, plan.real_tokens, plan.rows_over_budget],
                                             parallel_state.get_data_parallel_group())
    return {"actor/padding_frac": 1.0 - real / max(computed, 1.0), "actor/rows_over_token_budget": over}


def broadcast_from_last_stage(obj):
    """Send a picklable object from the last pipeline stage to every stage of this pipeline."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        return obj
    return broadcast_object(obj, parallel_state.get_pipeline_model_parallel_last_rank(),
                            parallel_state.get_pipeline_model_parallel_group())
