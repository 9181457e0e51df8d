"""Pipeline-parallel generation with the megatron rollout engine.

Oracle: the single-process engine (PP=1, TP=1; itself checked against no-cache full re-forwards in
``tests/test_rollout.py``) with the same weights and seeds. PP=2 (2 gloo processes) and TP=2 x PP=2
(4 processes) must return exactly its tokens, lengths and finish reasons on every rank: greedy,
sampled (temperature, top-k, top-p), continuous batching with 4 and 2 slots (finished responses'
slots refilled on every stage; finished rows looked for every 3rd step) and static chunks with rows cut across prompts, and with an EOS that
ends responses early (rows dropped from every stage's KV cache). A training step at PP=2 and
TP2 x PP2 against PP=1 is ``tests/test_parallel_equivalence.py`` (its layouts also generate).
"""
from __future__ import annotations

import pytest
import torch

from clipo_nemo.config import ModelConfig
from clipo_nemo.parallel.launcher import run_distributed
from clipo_nemo.rollout.base import GenerationParams
from test_rollout import _build as build_generation_model  # tests/ is on sys.path under pytest

VOCAB = 32  # the tiny tokenizer's size at max_operand=4
MODEL = ModelConfig(
    num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
    vocab_size=VOCAB, make_vocab_size_divisible_by=20,  # 40 rows: padding rows exist and must never be drawn
    max_position_embeddings=64,
)
PROMPTS = [[3, 5, 6, 14, 12, 15, 7, 8, 9, 10, 11, 4], [3, 5, 6, 20, 13, 4], [3, 5, 6, 17, 12, 19, 7, 8, 4]]
SEEDS = [11, 22, 33]
MAX_NEW = 8
RUNS = ("greedy", "sampled", "sampled_chunked", "sampled_static_chunks", "greedy_with_eos", "greedy_with_eos_2_slots")


def _generate_rank(rank, world_size, tp, pp, full_state):
    from megatron.core import parallel_state

    from clipo_nemo.parallel.state import destroy_parallel_state

    try:
        model, full_state, _, engine = build_generation_model(tp, full_state, pp, MODEL)
        sampled = GenerationParams(n=3, max_new_tokens=MAX_NEW, temperature=0.8, top_k=6, top_p=0.9)
        res = {"state": full_state, "layers": len(model.decoder.layers), "has_output_layer": model.post_process,
               "pp_rank": parallel_state.get_pipeline_model_parallel_rank()}
        res["greedy"] = engine().generate(PROMPTS, GenerationParams(n=2, max_new_tokens=MAX_NEW, temperature=0.0), SEEDS)
        res["sampled"] = engine().generate(PROMPTS, sampled, SEEDS)
        res["sampled_chunked"] = engine(max_batch_size=4).generate(PROMPTS, sampled, SEEDS)  # 4 slots, refilled
        res["sampled_static_chunks"] = engine(max_batch_size=4, batching="static").generate(PROMPTS, sampled, SEEDS)
        first = res["greedy"].response(0)
        res["eos_at"] = next(k for k in range(1, MAX_NEW) if first[k] not in first[:k]) + 1
        eos = first[res["eos_at"] - 1]  # ends prompt 0's greedy response after eos_at (> 1) tokens
        res["greedy_with_eos"] = engine(eos_token_ids=[eos]).generate(
            PROMPTS, GenerationParams(n=1, max_new_tokens=MAX_NEW, temperature=0.0), SEEDS)
        res["greedy_with_eos_2_slots"] = engine(eos_token_ids=[eos], max_batch_size=2, finish_check_every=3).generate(
            PROMPTS, GenerationParams(n=2, max_new_tokens=MAX_NEW, temperature=0.0), SEEDS)
        return res
    finally:
        destroy_parallel_state()


@pytest.fixture(scope="module")
def single():
    return run_distributed(_generate_rank, 1, args=(1, 1, None), timeout_s=240)[0]


def _assert_same_tokens(ranks, single):
    for rank, res in enumerate(ranks):
        for name in RUNS:
            got, expected = res[name], single[name]
            assert torch.equal(got.tokens, expected.tokens), f"rank {rank} {name}:\n{got.tokens}\n{expected.tokens}"
            assert torch.equal(got.lengths, expected.lengths) and got.finish_reasons == expected.finish_reasons, (
                f"rank {rank} {name}")


def test_single_process_reference_is_non_trivial(single):
    sampled = single["sampled"]
    assert len({tuple(sampled.response(r)) for r in range(len(sampled.lengths))}) > len(PROMPTS)  # samples differ
    assert (sampled.tokens < VOCAB).all()  # poisoned padding rows are never drawn
    with_eos = single["greedy_with_eos"]
    assert with_eos.finish_reasons[0] == "stop" and int(with_eos.lengths[0]) == single["eos_at"] > 1
    assert "length" in with_eos.finish_reasons  # rows finish at different steps: rows get dropped
    assert single["layers"] == MODEL.num_layers
    # continuous batching (the default) and static chunks agree
    assert torch.equal(single["sampled_chunked"].tokens, single["sampled_static_chunks"].tokens)


def test_pipeline_parallel_2_generates_the_single_process_tokens(single):
    ranks = run_distributed(_generate_rank, 2, args=(1, 2, single["state"]), timeout_s=300)
    assert [(r["pp_rank"], r["layers"], r["has_output_layer"]) for r in ranks] == [(0, 2, False), (1, 2, True)]
    _assert_same_tokens(ranks, single)


def test_tensor_2_x_pipeline_2_generates_the_single_process_tokens(single):
    ranks = run_distributed(_generate_rank, 4, args=(2, 2, single["state"]), timeout_s=400)
    assert sorted((r["pp_rank"], r["layers"], r["has_output_layer"]) for r in ranks) == [
        (0, 2, False), (0, 2, False), (1, 2, True), (1, 2, True)]
    _assert_same_tokens(ranks, single)
