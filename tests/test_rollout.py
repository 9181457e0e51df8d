"""The megatron rollout engine and its sampling math.

Oracles: hand-computed distributions for the sampling functions; for generation, step-by-step full
re-forwards of the same model without a KV cache (greedy argmax, and the same per-response uniforms
for sampled runs); a single process for TP=2. Real gloo processes run the model.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from clipo_nemo.config import ModelConfig, ParallelConfig
from clipo_nemo.parallel.launcher import run_distributed
from clipo_nemo.rollout.base import GenerationParams, ROLLOUT_ENGINES, build_rollout_engine
from clipo_nemo.rollout.sampling import filtered_probs, inverse_cdf_sample, response_uniforms

VOCAB = 32  # the tiny tokenizer's size at max_operand=4
MODEL = ModelConfig(
    num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
    vocab_size=VOCAB, make_vocab_size_divisible_by=20,  # 40 rows at TP=1 and TP=2: padding is exercised
    max_position_embeddings=64,
)
# different lengths: exercises prefill to the shortest prompt, then prompt tokens fed while decoding
PROMPTS = [[3, 5, 6, 14, 12, 15, 7, 8, 9, 10, 11, 4], [3, 5, 6, 20, 13, 4], [3, 5, 6, 17, 12, 19, 7, 8, 4]]
SEEDS = [11, 22, 33]
MAX_NEW = 8
SAMPLED = dict(temperature=0.8, top_k=6)


# ------------------------------------------------------------------------------------------------
# Sampling math against hand-computed values
# ------------------------------------------------------------------------------------------------
def test_filtered_probs_hand_values():
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    assert torch.allclose(filtered_probs(logits, 1.0, 0, 0.5), torch.tensor([[0, 0, 3 / 7, 4 / 7]], dtype=torch.float64))
    assert torch.allclose(filtered_probs(logits, 1.0, 2, 1.0), torch.tensor([[0, 0, 3 / 7, 4 / 7]], dtype=torch.float64))
    sqrt = torch.tensor([0.1, 0.2, 0.3, 0.4]).sqrt().double()
    assert torch.allclose(filtered_probs(logits, 2.0, 0, 1.0), (sqrt / sqrt.sum())[None])
    # top_p smaller than the largest probability keeps exactly that token
    assert torch.equal(filtered_probs(logits, 1.0, 0, 0.1)[0] > 0, torch.tensor([False, False, False, True]))


def test_inverse_cdf_sample_hand_values_and_frequencies():
    probs = torch.tensor([[0.0, 0.0, 3 / 7, 4 / 7]], dtype=torch.float64).expand(5, 4)
    u = torch.tensor([0.0, 0.42, 0.43, 0.999999, 1 - 2**-53], dtype=torch.float64)
    assert inverse_cdf_sample(probs, u).tolist() == [2, 2, 3, 3, 3]
    assert inverse_cdf_sample(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64), torch.tensor([1 - 2**-53])).item() == 1
    target = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    draws = inverse_cdf_sample(target.expand(20000, 4), torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    freq = torch.bincount(draws, minlength=4).double() / 20000
    assert freq[1] == 0 and torch.allclose(freq, target, atol=0.015)


def test_response_uniforms_are_per_response_streams():
    a = response_uniforms(7, 0, 16)
    assert torch.equal(a, response_uniforms(7, 0, 16)) and ((a >= 0) & (a < 1)).all()
    assert not torch.equal(a, response_uniforms(7, 1, 16)) and not torch.equal(a, response_uniforms(8, 0, 16))
    with pytest.raises(ValueError, match="non-negative"):
        response_uniforms(-1, 0, 4)


def test_params_and_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="top_p=0"):
        GenerationParams(top_p=0.0)
    with pytest.raises(ValueError, match="n=0"):
        GenerationParams(n=0)
    assert "megatron" in ROLLOUT_ENGINES and "trtllm" in ROLLOUT_ENGINES

    class Rollout:
        engine = "nope"

    with pytest.raises(ValueError, match="rollout.engine='nope'"):
        build_rollout_engine(Rollout())


# ------------------------------------------------------------------------------------------------
# Generation with a real megatron-core GPTModel
# ------------------------------------------------------------------------------------------------
def _build(tp: int, full_state, pp: int = 1, model_cfg: ModelConfig = MODEL):
    """``model_cfg`` at TP x PP with ``full_state`` loaded, or (None) seeded peaked weights, whose
    full state is returned; the last stage's padding vocabulary rows poisoned. Also used by
    ``tests/test_rollout_pp.py``."""
    from clipo_nemo.data.tiny_tokenizer import build_tiny_tokenizer
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.models.sharding import gather_full_state_dict, load_full_state_dict
    from clipo_nemo.parallel.state import init_parallel_state
    from clipo_nemo.rollout.megatron_engine import MegatronRolloutEngine

    warnings.filterwarnings("ignore")
    parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    init_parallel_state(parallel)
    model = build_policy_model(model_cfg, parallel)
    if full_state is None:  # peaked, non-trivial weights: greedy has clear winners, samples vary
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.5 * torch.randn(param.shape, generator=gen))
        full_state = gather_full_state_dict(model, VOCAB)
    else:
        load_full_state_dict(model, full_state, VOCAB)

    def poison_padding_rows(module, inputs, output):  # the engine must never sample a padding row
        logits, bias = output
        logits[..., VOCAB:] = 1e4
        return logits, bias

    if model.post_process:  # the stage that holds the output layer
        model.output_layer.register_forward_hook(poison_padding_rows)
    tokenizer = build_tiny_tokenizer(4)
    assert len(tokenizer) == VOCAB
    return model, full_state, tokenizer, lambda **kw: MegatronRolloutEngine(model, tokenizer, vocab_size=VOCAB, **kw)


@contextlib.contextmanager
def _recording_output_layer_shapes(model):
    """Yields a list that collects (input shape, output shape) of every ``output_layer`` call."""
    shapes = []
    handle = model.output_layer.register_forward_hook(
        lambda module, inputs, output: shapes.append((tuple(inputs[0].shape), tuple(output[0].shape))))
    try:
        yield shapes
    finally:
        handle.remove()


def _generate_with_full_prefill_logits(engine, params):
    """The engine's error message when megatron would return logits at every prompt position."""
    from megatron.core.inference import contexts

    real = contexts.StaticInferenceContext

    class FullLogitsContext(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.materialize_only_last_token_logits = False

    contexts.StaticInferenceContext = FullLogitsContext
    try:
        engine.generate(PROMPTS, params, SEEDS)
    except RuntimeError as error:
        return str(error)
    finally:
        contexts.StaticInferenceContext = real
    return None


@torch.no_grad()
def _oracle_generate(model, prompt, max_new, pick):
    """Full re-forward per step (no KV cache); ``pick(step, logits [1, V]) -> token``."""
    seq = list(prompt)
    for step in range(max_new):
        s = len(seq)
        causal = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
        logits = model(torch.tensor([seq]), torch.arange(s)[None], causal)[:, -1, :VOCAB]
        seq.append(int(pick(step, logits)))
    return seq[len(prompt):]


def _single_process_rank(rank, world_size):
    from clipo_nemo.parallel.state import destroy_parallel_state
    from clipo_nemo.rollout.sampling import filtered_probs, inverse_cdf_sample, response_uniforms

    model, state, tok, engine = _build(1, None)
    try:
        res = {"state": state, "eos": tok.eos_token_id}
        greedy = GenerationParams(n=2, max_new_tokens=MAX_NEW, temperature=0.0)
        with _recording_output_layer_shapes(model) as res["output_layer_shapes"]:
            res["greedy"] = engine().generate(PROMPTS, greedy, SEEDS)
        with _recording_output_layer_shapes(model) as res["output_layer_shapes_static"]:
            res["greedy_static"] = engine(batching="static").generate(PROMPTS, greedy, SEEDS)
        model.eval()
        res["greedy_oracle"] = [_oracle_generate(model, p, MAX_NEW, lambda s, lg: lg.argmax(-1)) for p in PROMPTS]

        res["full_prefill_refused"] = _generate_with_full_prefill_logits(engine(), greedy)
        res["full_prefill_refused_static"] = _generate_with_full_prefill_logits(engine(batching="static"), greedy)

        sampled = GenerationParams(n=3, max_new_tokens=MAX_NEW, **SAMPLED)
        res["sampled"] = engine().generate(PROMPTS, sampled, SEEDS)
        res["sampled_again"] = engine().generate(PROMPTS, sampled, SEEDS)
        res["sampled_chunked"] = engine(max_batch_size=3).generate(PROMPTS, sampled, SEEDS)  # one prompt per chunk
        res["sampled_reordered"] = engine().generate(PROMPTS[::-1], sampled, SEEDS[::-1])
        res["sampled_alone"] = engine().generate(PROMPTS[1:2], sampled, SEEDS[1:2])
        res["sampled_other_seeds"] = engine().generate(PROMPTS, sampled, [s + 1 for s in SEEDS])

        def sampled_pick(prompt_i, j):
            u = response_uniforms(SEEDS[prompt_i], j, MAX_NEW)
            return lambda step, lg: inverse_cdf_sample(filtered_probs(lg, SAMPLED["temperature"], SAMPLED["top_k"], 1.0), u[step:step + 1])

        res["sampled_oracle"] = [
            _oracle_generate(model, p, MAX_NEW, sampled_pick(i, j)) for i, p in enumerate(PROMPTS) for j in range(3)
        ]
        # Finish reasons: EOS ids and stop strings chosen from the oracle's greedy continuations.
        eos_id = res["greedy_oracle"][0][3]
        res["with_eos"] = engine(eos_token_ids=[eos_id]).generate(PROMPTS, GenerationParams(n=1, max_new_tokens=MAX_NEW, temperature=0.0), SEEDS)
        res["eos_id"] = eos_id
        stop_word = tok.convert_ids_to_tokens(res["greedy_oracle"][0][2])
        res["stop_word"] = stop_word
        res["with_stop"] = engine().generate(PROMPTS, GenerationParams(n=1, max_new_tokens=MAX_NEW, temperature=0.0, stop=(stop_word,)), SEEDS)
        res["with_stop_every_3"] = engine(finish_check_every=3, max_batch_size=2).generate(
            PROMPTS, GenerationParams(n=1, max_new_tokens=MAX_NEW, temperature=0.0, stop=(stop_word,)), SEEDS)
        res["decoded_oracle"] = [[tok.decode(o[: k + 1]) for k in range(MAX_NEW)] for o in res["greedy_oracle"]]
        res["continuous_vs_static"] = _continuous_against_static_chunks(engine, eos_id)
        res["finish_checks"] = _finish_checks(engine)
        return res
    finally:
        destroy_parallel_state()


def _continuous_against_static_chunks(engine, eos_id):
    """Static chunks (today's engine) and continuous batching with 1-9 slots, the same seeds; an EOS
    that ends some responses early, so slots free at different steps and take waiting responses;
    continuous also with finished rows looked for only every 3rd decode step.
    Records the timeline shifts of the slot cache and the decode passes of each run."""
    from clipo_nemo.rollout import kv_slots

    shifts = []
    real_shift = kv_slots.SlotCache.shift_to

    def recording_shift(cache, new_end):
        shifts.append((cache.end, new_end))
        real_shift(cache, new_end)

    kv_slots.SlotCache.shift_to = recording_shift
    runs = {}
    try:
        for label, params in (("sampled", GenerationParams(n=3, max_new_tokens=MAX_NEW, **SAMPLED)),
                              ("greedy", GenerationParams(n=2, max_new_tokens=MAX_NEW, temperature=0.0))):
            for batching, every in (("static", 1), ("continuous", 1), ("continuous_check_every_3", 3)):
                for slots in (None, 1, 2, 4):
                    shifts.clear()
                    eng = engine(batching=batching.split("_")[0], max_batch_size=slots, eos_token_ids=[eos_id],
                                 finish_check_every=every)
                    runs[label, batching, slots] = (eng.generate(PROMPTS, params, SEEDS), eng.decode_passes, list(shifts))
    finally:
        kv_slots.SlotCache.shift_to = real_shift
    return runs


def _finish_checks(engine):
    """(looks for finished rows, decode passes, tokens) with finished rows looked for every 1 and every 4 steps."""
    runs = {}
    for every in (1, 4):
        eng = engine(finish_check_every=every)
        calls = []
        real = eng._mark_finished
        eng._mark_finished = lambda rows, out, params: (calls.append(len(rows)), real(rows, out, params))
        out = eng.generate(PROMPTS, GenerationParams(n=2, max_new_tokens=MAX_NEW, **SAMPLED), SEEDS)
        runs[every] = (len(calls), eng.decode_passes, out.tokens)
    return runs


def _tp_rank(rank, world_size, full_state):
    from clipo_nemo.parallel.state import destroy_parallel_state

    model, _, _, engine = _build(world_size, full_state)
    try:
        res = {}
        with _recording_output_layer_shapes(model) as res["output_layer_shapes"]:
            res["greedy"] = engine().generate(PROMPTS, GenerationParams(n=2, max_new_tokens=MAX_NEW, temperature=0.0), SEEDS)
        res["sampled"] = engine().generate(PROMPTS, GenerationParams(n=3, max_new_tokens=MAX_NEW, **SAMPLED), SEEDS)
        return res
    finally:
        destroy_parallel_state()


@pytest.fixture(scope="module")
def single():
    return run_distributed(_single_process_rank, 1, timeout_s=240)[0]


def _rows(out, first_row, count):
    return [out.response(r) for r in range(first_row, first_row + count)]


def test_greedy_with_kv_cache_equals_full_reforward_oracle(single):
    out = single["greedy"]
    assert out.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    for i, expected in enumerate(single["greedy_oracle"]):
        eos = single["eos"]
        cut = expected.index(eos) + 1 if eos in expected else MAX_NEW
        assert _rows(out, 2 * i, 2) == [expected[:cut]] * 2, f"prompt {i}"
    assert (out.tokens < VOCAB).all()


def test_sampled_with_kv_cache_equals_oracle_with_the_same_uniforms(single):
    out, eos = single["sampled"], single["eos"]
    for row, expected in enumerate(single["sampled_oracle"]):
        cut = expected.index(eos) + 1 if eos in expected else MAX_NEW
        assert out.response(row) == expected[:cut], f"row {row}"
        assert out.finish_reasons[row] == ("stop" if eos in expected else "length")
    assert (out.tokens < VOCAB).all()  # the poisoned padding rows are never drawn


def test_eos_stop_strings_and_length_give_the_right_finish_reasons(single):
    eos_id = single["eos_id"]
    out = single["with_eos"]
    for i, expected in enumerate(single["greedy_oracle"]):
        if eos_id in expected:
            assert out.response(i) == expected[: expected.index(eos_id) + 1] and out.finish_reasons[i] == "stop"
        else:
            assert out.response(i) == expected and out.finish_reasons[i] == "length" and int(out.lengths[i]) == MAX_NEW
    assert out.finish_reasons[0] == "stop" and int(out.lengths[0]) <= 4
    out, eos = single["with_stop"], single["eos"]
    for i, texts in enumerate(single["decoded_oracle"]):
        ends = [k for k, text in enumerate(texts) if single["stop_word"] in text]
        ends += [single["greedy_oracle"][i].index(eos)] if eos in single["greedy_oracle"][i] else []
        expected_len = min(ends) + 1 if ends else MAX_NEW
        assert int(out.lengths[i]) == expected_len, f"prompt {i}: {texts}"
        assert out.finish_reasons[i] == ("stop" if ends else "length")
    # prompt 0 ends on the stop string (its third token), not on EOS
    assert out.finish_reasons[0] == "stop" and int(out.lengths[0]) <= 3 and out.response(0)[-1] != eos
    # padding after each response
    assert (out.tokens[0, int(out.lengths[0]):] == out.pad_token_id).all()
    # finished rows looked for every 3rd step (they ran on in between): cut at the same token
    late = single["with_stop_every_3"]
    assert torch.equal(late.tokens, out.tokens) and late.finish_reasons == out.finish_reasons


def test_seeded_determinism_independent_of_batch_order_and_chunking(single):
    base = single["sampled"]
    for name in ("sampled_again", "sampled_chunked"):
        assert torch.equal(single[name].tokens, base.tokens) and single[name].finish_reasons == base.finish_reasons, name
    reordered = single["sampled_reordered"]
    for i in range(3):
        assert _rows(reordered, 3 * (2 - i), 3) == _rows(base, 3 * i, 3), f"prompt {i}"
    assert _rows(single["sampled_alone"], 0, 3) == _rows(base, 3, 3)
    assert _rows(single["sampled_other_seeds"], 0, 9) != _rows(base, 0, 9)
    assert len({tuple(r) for r in _rows(base, 0, 9)}) > 3  # samples within a group differ


def test_continuous_batching_gives_the_static_chunks_tokens(single):
    runs = single["continuous_vs_static"]
    for label in ("sampled", "greedy"):
        expected = runs[label, "static", None][0]
        assert "stop" in expected.finish_reasons and "length" in expected.finish_reasons  # early and full-length rows
        for batching in ("static", "continuous", "continuous_check_every_3"):
            for slots in (None, 1, 2, 4):
                out = runs[label, batching, slots][0]
                assert torch.equal(out.tokens, expected.tokens), f"{label} {batching} slots={slots}"
                assert torch.equal(out.lengths, expected.lengths) and out.finish_reasons == expected.finish_reasons
    # slots were reused: with 2 slots, continuous decoding needs fewer passes than chunks of 2 rows,
    # and the timeline (20 prompt + new positions + 2 of slack) was shifted left to make room
    sampled = {key[1:]: value for key, value in runs.items() if key[0] == "sampled"}
    assert sampled["continuous", 2][1] < sampled["static", 2][1]
    assert sampled["continuous", 1][1] == sum(sampled["continuous", None][0].lengths.tolist()) - 9
    assert any(new_end < end for end, new_end in sampled["continuous", 2][2])
    assert all(new_end >= 12 for _, new_end in sampled["continuous", 2][2])  # the longest prompt always fits
    # looking for finished rows every 3rd step only: same tokens (above), slots refilled a little later
    assert sampled["continuous", 2][1] <= sampled["continuous_check_every_3", 2][1] < sampled["static", 2][1]


def test_finished_rows_are_looked_for_every_few_steps_only(single):
    """Each look is the loop's one host synchronisation; the tokens do not depend on how often."""
    (every_step, passes, tokens), (every_4th, passes_4, tokens_4) = single["finish_checks"][1], single["finish_checks"][4]
    assert torch.equal(tokens, tokens_4) and passes == passes_4 == MAX_NEW - 1  # all 6 rows decode at once
    assert every_step == passes + 1  # after the prefill's token and after every decode step
    # steps 0 and 4, then at step 7 where the host's count says every row reached MAX_NEW
    assert every_4th == 3


def _assert_logits_only_where_sampled(shapes, batching="continuous"):
    """The output layer sees one position per row, never [rows, prompt_len, ...], gathered over TP.
    Static: the first call (all prompts up to the shortest one's length) gives [1, prompts, V_pad],
    each decode step [1, rows, V_pad]. Continuous: one call per prompt (prefilled alone, before any
    decode step here: all 6 rows fit) gives [1, 1, V_pad], then each decode step [1, rows, V_pad]."""
    vocab_padded = 40  # VOCAB rounded up to make_vocab_size_divisible_by * TP
    shortest = min(len(p) for p in PROMPTS)
    assert shortest > 1  # a prefill with full logits would show up as [shortest, prompts, V_pad]
    if batching == "static":
        prefills = [((1, len(PROMPTS), MODEL.hidden_size), (1, len(PROMPTS), vocab_padded))]
        # one call per step: prefill, then one per position up to the longest prompt + MAX_NEW - 1 at most
        most_calls = 1 + max(len(p) for p in PROMPTS) + MAX_NEW - 1 - shortest
    else:
        prefills = [((1, 1, MODEL.hidden_size), (1, 1, vocab_padded))] * len(PROMPTS)
        most_calls = len(PROMPTS) + MAX_NEW - 1  # every prompt's tokens are in the cache before decoding
    assert shapes[: len(prefills)] == prefills
    assert len(prefills) < len(shapes) <= most_calls
    for hidden, logits in shapes[len(prefills):]:
        assert hidden[0] == 1 and logits[0] == 1 and logits[2] == vocab_padded and hidden[1] == logits[1] <= 2 * len(PROMPTS)


def test_prefill_computes_logits_only_at_the_last_prompt_position(single):
    _assert_logits_only_where_sampled(single["output_layer_shapes"])
    _assert_logits_only_where_sampled(single["output_layer_shapes_static"], "static")
    # a megatron that returned every prompt position's logits would be refused, not used
    shortest, first = min(len(p) for p in PROMPTS), len(PROMPTS[0])
    assert f"logits for {first} positions of a {first}-token forward" in single["full_prefill_refused"]
    assert f"logits for {shortest} positions of a {shortest}-token forward" in single["full_prefill_refused_static"]


def test_tensor_parallel_2_gives_the_single_process_tokens(single):
    ranks = run_distributed(_tp_rank, 2, args=(single["state"],), timeout_s=240)
    for rank, res in enumerate(ranks):
        _assert_logits_only_where_sampled(res["output_layer_shapes"])
        for name in ("greedy", "sampled"):
            assert torch.equal(res[name].tokens, single[name].tokens), f"rank {rank} {name}"
            assert res[name].finish_reasons == single[name].finish_reasons
