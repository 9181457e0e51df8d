"""Truncated importance sampling (``actor.tis_cap``) reaches the policy update.

Oracle: with plain SGD (no momentum, decay, clipping, KL or entropy term) the update is linear in
the policy loss, and every policy loss is linear in each token's advantage. So weights that are the
same constant ``w`` on every token must move every parameter exactly ``w`` times as far as the
update without them, whatever the model computes.
"""
import math

import pytest
import torch

from clipo_nemo.config import ConfigError
from clipo_nemo.validation import validate_config
from clipo_nemo.parallel.launcher import run_distributed
from clipo_nemo.trainer.equivalence import make_global_batch, tiny_check_config


def _weight_change(rank, world_size, cfg, log_ratio):
    """Parameter change of one learning step; the engine's log-probs are the trainer's old log-probs
    minus ``log_ratio`` (None: an engine without log-probs)."""
    from clipo_nemo.models.forward import PolicyBatch
    from clipo_nemo.models.sharding import gather_full_state_dict
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state, seed_parallel_rngs
    from clipo_nemo.trainer.actor import Actor
    from clipo_nemo.trainer.step import Experience, learn_from_experience

    init_parallel_state(cfg.parallel)
    try:
        seed_parallel_rngs(0)
        actor = Actor.build(cfg)
        actor.sync_reference()
        tokens, mask, scores, group_ids = make_global_batch(cfg)
        exp = Experience(tokens, mask, scores, group_ids, torch.arange(len(scores)))
        if log_ratio is not None:
            old = actor.old_outputs(PolicyBatch(tokens, mask)).logprobs
            exp.rollout_logprobs = torch.where(mask, old - log_ratio, torch.full_like(old, float("nan")))
        before = gather_full_state_dict(actor.module, cfg.model.vocab_size)
        learn_from_experience(actor, None, exp, cfg, step=0)
        after = gather_full_state_dict(actor.module, cfg.model.vocab_size)
        return {name: after[name] - before[name] for name in before}
    finally:
        destroy_parallel_state()


def test_tis_weights_scale_the_policy_update():
    cfg = tiny_check_config()
    cfg.contrastive.enabled = False
    cfg.algorithm.kl_loss_coef, cfg.algorithm.entropy_coef, cfg.actor.clip_grad = 0.0, 0.0, 0.0
    cfg.rollout.engine, cfg.actor.tis_cap = "trtllm", 3.0
    plain, doubled, capped = (run_distributed(_weight_change, 1, (cfg, log_ratio), timeout_s=300)[0]
                              for log_ratio in (None, math.log(2.0), math.log(10.0)))
    moved = max(float(delta.abs().max()) for delta in plain.values())
    assert moved > 1e-4  # the step did change the weights
    # after - before of weights near 1 (the norms) is only known to float32's spacing there, 1.2e-7
    for name, delta in plain.items():
        torch.testing.assert_close(doubled[name], 2.0 * delta, rtol=1e-4, atol=3e-7, msg=name)
        torch.testing.assert_close(capped[name], 3.0 * delta, rtol=1e-4, atol=3e-7, msg=name)  # 10 capped at 3


@pytest.mark.parametrize("engine,cap,message", [("megatron", 2.0, "returns none"), ("trtllm", 0.5, "must be >= 1")])
def test_tis_cap_refused_where_it_cannot_apply(engine, cap, message):
    cfg = tiny_check_config()
    cfg.rollout.engine, cfg.actor.tis_cap = engine, cap
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
