"""Check a conversion: the converted checkpoint in megatron-core against the original in ``transformers``.

Both run in fp32 on the CPU (one process): full-sequence logits of a few prompts are compared, and
greedy continuations (our rollout engine against ``transformers`` ``generate(do_sample=False)``)
must agree token for token. The megatron model is built, used and freed before the HF model is
loaded, so only one copy of the model is in memory at a time.
"""
from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from clipo_nemo.algorithms.checks import nan_max

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Question: What is 17 * 23? Answer:",
    "Once upon a time, in a small village,",
)
LOGIT_TOLERANCE = 1e-3


@dataclass
class VerifyResult:
    """Largest |logit difference| over every prompt position and vocabulary entry, and how many
    prompts' greedy continuations were identical."""

    max_abs_logit_diff: float
    greedy_matches: int
    prompts: int

    @property
    def ok(self) -> bool:  # False for a NaN difference (every comparison with NaN is false)
        return self.max_abs_logit_diff <= LOGIT_TOLERANCE and self.greedy_matches == self.prompts


def full_logits(model: torch.nn.Module, tokens: torch.Tensor, vocab_size: int) -> Optional[torch.Tensor]:
    """Logits [B, S, vocab_size] (gathered over TP, float32) of a megatron GPTModel at any TP/PP.

    Runs megatron's forward-only pipeline schedule with one micro-batch; returns the logits on the
    last pipeline stage and None on the others. Call on every rank of the model-parallel group.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = next(model.parameters()).device
    tokens = tokens.to(device)
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    causal = None  # on GPU megatron's attention applies causality itself; on CPU it needs the mask
    if not torch.cuda.is_available():
        causal = torch.ones(1, 1, tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=device).triu(1)

    def forward_step(data_iterator, stage):
        output = stage(next(data_iterator), positions, causal, runtime_gather_output=True)
        return output, lambda logits: (logits.new_zeros(()), logits[..., :vocab_size].float().detach())

    with torch.no_grad():
        infos = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
        )
    return infos[0] if infos else None


def response_logprobs(model: torch.nn.Module, prompts: Sequence[Sequence[int]], output, temperature: float,
                      vocab_size: int) -> Optional[torch.Tensor]:
    """The megatron model's own log-prob of every generated token of a rollout ``output`` (a
    :class:`clipo_nemo.rollout.base.RolloutOutput` with ``logprobs``), under ``softmax(logits / T)``:
    [N, T] float64 on the CPU, NaN past each response; None off the last pipeline stage. Collective
    over the model-parallel group (:func:`full_logits`)."""
    rows = [list(prompts[int(i)]) + output.response(r) for r, i in enumerate(output.prompt_index)]
    width = max(len(r) for r in rows)
    logits = full_logits(model, torch.tensor([r + [0] * (width - len(r)) for r in rows]), vocab_size)
    if logits is None:
        return None
    logp = torch.log_softmax(logits.double().cpu() / temperature, -1)
    result = torch.full(output.logprobs.shape, float("nan"), dtype=torch.float64)
    for r, row in enumerate(rows):
        start = len(prompts[int(output.prompt_index[r])])
        for t in range(start, len(row)):
            result[r, t - start] = logp[r, t - 1, row[t]]
    return result


def _prompt_ids(tokenizer, prompts: Sequence[str]) -> List[List[int]]:
    return [tokenizer(prompt)["input_ids"] for prompt in prompts]


def _megatron_side(ckpt: Path, prompt_ids: List[List[int]], tokenizer, new_tokens: int):
    """(logits per prompt, greedy continuation per prompt) of the converted checkpoint, fp32, one process."""
    from clipo_nemo.config import ParallelConfig
    from clipo_nemo.conversion.weights import load_weights_into_model, model_config_of
    from clipo_nemo.models.policy import build_policy_model
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state
    from clipo_nemo.rollout.base import GenerationParams
    from clipo_nemo.rollout.megatron_engine import MegatronRolloutEngine

    model_cfg = dataclasses.replace(model_config_of(ckpt), params_dtype="float32")
    parallel = ParallelConfig()
    init_parallel_state(parallel)
    try:
        model = build_policy_model(model_cfg, parallel)
        load_weights_into_model(model, ckpt, model_cfg.vocab_size)
        model.eval()
        logits = [full_logits(model, torch.tensor([ids]), model_cfg.vocab_size)[0] for ids in prompt_ids]
        engine = MegatronRolloutEngine(model, tokenizer, vocab_size=model_cfg.vocab_size)
        out = engine.generate(prompt_ids, GenerationParams(n=1, max_new_tokens=new_tokens, temperature=0.0),
                              seeds=[0] * len(prompt_ids))
        greedy = [out.response(row) for row in range(len(prompt_ids))]
        del model, engine
        return logits, greedy
    finally:
        destroy_parallel_state()
        gc.collect()


def _transformers_side(hf_dir: Path, prompt_ids: List[List[int]], eos_token_id: int, new_tokens: int):
    """(logits per prompt, greedy continuation per prompt) of the original HF model in fp32."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    greedy_config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos_token_id,
                                     pad_token_id=eos_token_id)
    logits, greedy = [], []
    with torch.no_grad():
        for ids in prompt_ids:
            tokens = torch.tensor([ids])
            logits.append(model(tokens).logits[0].float())
            generated = model.generate(tokens, attention_mask=torch.ones_like(tokens), generation_config=greedy_config)
            greedy.append(generated[0, len(ids):].tolist())
    del model
    gc.collect()
    return logits, greedy


def verify_conversion(
    ckpt, hf_dir, *, prompts: Sequence[str] = DEFAULT_PROMPTS, new_tokens: int = 16,
    log: Optional[Callable[[str], None]] = print,
) -> VerifyResult:
    """Compare the converted checkpoint ``ckpt`` with the HF model in ``hf_dir`` on ``prompts``."""
    from transformers import AutoTokenizer

    from clipo_nemo.conversion.weights import tokenizer_dir

    log = log or (lambda line: None)
    ckpt, hf_dir = Path(ckpt), Path(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir(ckpt) or hf_dir))
    prompt_ids = _prompt_ids(tokenizer, prompts)
    ours_logits, ours_greedy = _megatron_side(ckpt, prompt_ids, tokenizer, new_tokens)
    hf_logits, hf_greedy = _transformers_side(hf_dir, prompt_ids, tokenizer.eos_token_id, new_tokens)
    diffs, matches = [], 0
    for prompt, ours, theirs, ours_tokens, hf_tokens in zip(prompts, ours_logits, hf_logits, ours_greedy, hf_greedy):
        diff = (ours - theirs).abs().max().item()  # NaN if either side has one (torch's max propagates it)
        diffs.append(diff)
        matches += ours_tokens == hf_tokens
        log(f"{prompt!r}: max |logit diff| {diff:.3g}, greedy {'equal' if ours_tokens == hf_tokens else 'DIFFERENT'}"
            f" ({len(ours_tokens)} tokens: {tokenizer.decode(ours_tokens)!r})")
    return VerifyResult(nan_max(diffs), matches, len(prompts))
