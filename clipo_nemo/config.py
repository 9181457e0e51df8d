"""The whole configuration schema of clipo-nemo, every key documented.

YAML files under ``examples/conf/`` only set values; Hydra validates them against these dataclasses
(structured configs), so an unknown key or a wrong type stops a run before any model is built.
Semantic checks that span sections live in :func:`validate_config`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union, get_type_hints


# --------------------------------------------------------------------------------------------------
# CLIPO: contrastive head, contrastive loss and reward shaping (SPEC steps 4-9)
# --------------------------------------------------------------------------------------------------
@dataclass
class HeadConfig:
    """The contrastive head ``z = normalize(W h)`` on the pooled last hidden state."""

    type: str = "linear"  # "linear" (Linear(H, D), no bias) or "mlp" (Linear(H,H) -> ReLU -> Linear(H,D))
    dim: int = 512  # D, the embedding size (track I: 512, track II: 2048)
    fixed: bool = False  # CLIPO-fixed ablation: the head is never updated
    lr: float = 1e-3  # the head's own AdamW learning rate
    weight_decay: float = 0.01  # the head's AdamW weight decay
    tp_mode: str = "replicated"  # under tensor parallel: "replicated" weights or "column" (D split over TP)


@dataclass
class ContrastiveConfig:
    """Group InfoNCE and the dense reward it gives (SPEC steps 5-8)."""

    enabled: bool = True  # false = plain GRPO/DAPO/GSPO/GMPO, no head, no contrastive reward
    loss: str = "infonce"  # "infonce" | "supcon_out" | "supcon_in" | "soft_nn"
    similarity: str = "cosine"  # "cosine", "l2" (1 - sqrt(max(2 - 2 s, eps))) or "neg_cosine" (-s)
    temperature: float = 0.05  # tau; logits are s / tau (paper's best on track II: 0.02)
    level: str = "group"  # "group" | "cross" | "batch": where positives and candidates come from
    eps: float = 1e-8  # log(sum exp + eps) on max-shifted logits, as the authors' code; 0 = exact log-sum-exp
    # What each anchor's logits are shifted by before those eps-logs: "candidates" = the maximum over the anchor
    # and its candidates; "batch" = the maximum of its whole global-batch row, other groups included (the
    # authors' code; O(B^2 D)). They differ only for similarity=neg_cosine, whose row maximum is not the self-similarity.
    row_shift: str = "candidates"
    anchors: str = "correct"  # "correct" | "incorrect" | "all" (reference masked_label 0/1/-1); positives
    # share the anchor's correctness; only correct responses receive the contrastive reward
    skip_trivial: bool = True  # false: anchors without a negative count too (without a positive: loss 0)
    reward_scale: float = 0.2  # lambda in rc = c - lambda * L (> 0)
    reward_offset: float = 0.0  # c, the reward of responses that are not valid anchors
    reward_floor: float = -0.5  # rc is clamped from below at this value (must be < reward_offset)
    warmup_steps: int = 0  # steps where only the head trains (track I: 14, track II: 58: one epoch, as SPEC says).
    #   Steps count from 0 here: 14 skips 14 policy updates. The authors' critic_warmup=14 counts from 1 and
    #   skips 13 (set 13 / 57 to match their code exactly)
    seed: int = 1234  # seeds the generator that draws each InfoNCE anchor's positive
    # The pooled hidden state h_i the head sees (SPEC step 3): the final-norm states H summed over a window of
    # the response and divided by its length L. "mean": every response position 0..L-1 (the paper's Eq. 9,
    # SPEC's formula). "authors": positions 0..L-2, as the authors' patched rollout engine sums one state per
    # decode step and never computes the last token's (usually EOS's); a 1-token response keeps its only state.
    pooling: str = "mean"
    # Placebo arm (ablations): the contrastive rewards are permuted at random among the rewarded (correct,
    # valid-anchor) responses of each group before they enter the advantages: the same reward noise and
    # distribution, no link to the embeddings. A benefit of CLIPO counts only if it beats this arm too.
    placebo: bool = False
    head: HeadConfig = field(default_factory=HeadConfig)


# --------------------------------------------------------------------------------------------------
# Policy optimisation (SPEC steps 10-11 and the policy-loss table)
# --------------------------------------------------------------------------------------------------
@dataclass
class AlgorithmConfig:
    """Advantage estimation and the policy loss."""

    policy_loss: str = "grpo"  # registry name: "grpo" | "dapo" | "gspo" | "gmpo"
    clip_ratio_low: float = 0.2  # epsilon_low (gspo: 3e-4; gmpo: clip on the log-ratio, 0.4)
    clip_ratio_high: float = 0.2  # epsilon_high (dapo: 0.28; gspo: 4e-4)
    # Dual clip (grpo/dapo): the loss of a negative-advantage token is capped at -A * c (> 1); it only
    # matters where the ratio exceeds c. 3.0 = the authors' vanilla loss; null = off. gspo/gmpo: unused.
    dual_clip_c: Optional[float] = 3.0
    # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm (the mini-batch's
    # total over sequences / rollout.max_new_tokens). gspo's policy term is always seq-mean-token-mean
    # (gmpo's a mean over sequences) whatever this says; it still aggregates the KL and entropy terms.
    loss_agg_mode: str = "token-mean"
    kl_loss_type: str = "low_var_kl"  # k1 | k2 | k3 | low_var_kl
    kl_loss_coef: float = 0.001  # 0 disables the KL loss and the reference policy
    adv_estimator: str = "grpo"  # "grpo" (group mean/std), "grpo_no_std" (Dr. GRPO), "loo" (leave-one-out)
    adv_eps: float = 1e-6  # added to the group std
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal and refill the batch
    dynamic_sampling_max_batches: int = 4  # rollout batches drawn at most to refill one training batch
    entropy_coef: float = 0.0  # entropy bonus (0 = off)


# --------------------------------------------------------------------------------------------------
# Policy model and its parallel layout (megatron-core GPTModel; Qwen2/Qwen2.5 and Llama 3 shapes)
# --------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The policy's architecture. Defaults are the tiny fp32 test model; real runs set every key."""

    num_layers: int = 2  # transformer layers (must divide by parallel.pipeline_parallel_size)
    hidden_size: int = 64  # H, the residual width (and the pooled hidden state's size)
    ffn_hidden_size: int = 128  # SwiGLU inner width (gate and up each have this many rows)
    num_attention_heads: int = 4  # query heads (must divide by the TP size)
    num_query_groups: int = 2  # key/value heads for grouped-query attention (= heads for MHA; divides by TP)
    kv_channels: Optional[int] = None  # per-head size; None = hidden_size / num_attention_heads
    vocab_size: int = 128  # real vocabulary size; logits of the TP padding rows beyond it are masked out
    make_vocab_size_divisible_by: int = 128  # the embedding is padded to a multiple of this times TP
    max_position_embeddings: int = 4096  # longest prompt+response the model is built for
    rotary_base: float = 10000.0  # RoPE theta (Qwen2.5: 1000000, Llama 3: 500000)
    rope_scaling: bool = False  # Llama 3.1 "llama3" RoPE frequency scaling
    rope_scaling_factor: float = 8.0  # its factor (used only when rope_scaling is true)
    add_qkv_bias: bool = False  # bias on the fused QKV projection (Qwen2/Qwen2.5: true, Llama: false)
    tie_word_embeddings: bool = False  # output layer shares the input embedding (small Qwen2.5 models)
    norm_epsilon: float = 1e-6  # RMSNorm epsilon (Qwen2: 1e-6, Llama 3: 1e-5)
    params_dtype: str = "float32"  # "float32" | "bfloat16" | "float16": parameter and compute dtype
    init_method_std: float = 0.02  # std of the normal weight init (before any checkpoint is loaded)
    attention_dropout: float = 0.0  # dropout on attention probabilities (RL fine-tuning: 0)
    hidden_dropout: float = 0.0  # dropout on the residual branches (RL fine-tuning: 0)
    recompute: str = "none"  # activation recomputation: "none" | "selective" (core attention) | "full" (whole layers)
    recompute_num_layers: int = 1  # with recompute=full: layers per recomputed block (megatron's "uniform" method)


@dataclass
class ParallelConfig:
    """How the policy is split over processes; data parallel = world / (TP * PP * CP)."""

    tensor_parallel_size: int = 1  # TP: heads, query groups, FFN and vocabulary split over this many ranks
    pipeline_parallel_size: int = 1  # PP: layers split into this many stages
    context_parallel_size: int = 1  # CP: sequence split over ranks (GPU + Transformer Engine only)
    sequence_parallel: bool = False  # shard norms/dropout activations over TP along the sequence (GPU only)
    micro_batch_size: int = 1  # responses per forward/backward micro-batch on one data-parallel rank
    max_tokens_per_micro_batch: int = 0  # > 0: micro-batches by token budget (length-sorted, padded tokens
    #   rows * longest <= budget) instead of micro_batch_size rows; 0 = fixed micro_batch_size
    seed: int = 1234  # seeds weight init and megatron's per-TP-rank RNG streams
    timeout_s: float = 1800.0  # process-group timeout (default group and megatron's groups): a rank that waits
    #   longer than this in a collective (a peer hung, not dead) raises instead of blocking; long for NCCL at
    #   scale (uneven rollouts, checkpoint saves), short in tests; it also bounds the rendezvous at start


# --------------------------------------------------------------------------------------------------
# Rollouts (SPEC step 1)
# --------------------------------------------------------------------------------------------------
@dataclass
class RolloutConfig:
    """Generation of the training responses."""

    engine: str = "megatron"  # rollout engine registry name: "megatron" (the policy's own megatron-core model) or
    #   "trtllm" (TensorRT-LLM 1.2.x, its container; weights refitted in place each step; README)
    n: int = 16  # responses sampled per prompt (the group size)
    temperature: float = 1.0  # sampling temperature (> 0); also applied to the log-probs of the update
    top_p: float = 1.0  # nucleus sampling (1.0 = off)
    top_k: int = 0  # top-k sampling (0 = off)
    max_new_tokens: int = 2048  # response length cap (track I: 2048, track II: 4096)
    stop: List[str] = field(default_factory=list)  # stop strings, besides the tokenizer's EOS
    seed: int = 1234  # base seed; each request's sampling is seeded from it
    max_batch_size: Optional[int] = None  # most responses decoded together; None = as many as kv_cache_gb allows
    kv_cache_gb: Union[float, int, str] = 16.0  # KV-cache budget per GPU (GiB), sets the rows decoded together;
    #   "auto": what the memory plan's rollout phase leaves of trainer.gpu_memory_gib after the weights, the
    #   training state that stays, the generation logits and the overhead (planner.plan.derived_kv_cache_gib)
    batching: str = "continuous"  # engine=megatron: "continuous" (a finished response's KV slot takes the next
    #   waiting response) or "static" (chunks of rows decoded one after another, each until its longest ends)
    finish_check_every: int = 8  # engine=megatron, continuous: decode steps between looks for finished responses
    #   (each look is one host synchronisation; the tokens do not depend on it; 1 = every step)
    trtllm_kv_cache_fraction: float = 0.4  # engine=trtllm: upper bound on the share of the GPU memory free at engine
    #   start that TensorRT-LLM's KV cache takes (KvCacheConfig.free_gpu_memory_fraction); released while training
    trtllm_kv_cache_gb: float = 16.0  # engine=trtllm: the engine's KV cache per GPU in GiB (KvCacheConfig.max_tokens
    #   = this / one token's KV bytes at TP x PP); the layout planner counts it next to the trainer's memory
    trtllm_refit_bucket_mb: float = 512.0  # engine=trtllm: MiB of HF tensors per weight-update call of a refit
    trtllm_dtype: str = "bfloat16"  # engine=trtllm: the engine's weight/compute dtype, "bfloat16" | "float16"
    #   (TensorRT-LLM's attention backend serves no float32); the refit casts the policy's weights to it
    trtllm_sleep_weights: bool = True  # engine=trtllm: release the engine's weights while training too (TRT-LLM
    #   1.2 copies them to pinned host memory and back each step); false keeps them on the GPU (no copy, the
    #   planner counts them during training)
    trtllm_refit_check_tolerance: float = 0.05  # engine=trtllm: after each refit, the largest allowed mean
    #   |logp_engine - logp_trainer| over a fixed 8-token probe; above it the run stops (a misnamed tensor)
    trtllm_gpus_per_node: int = 8  # engine=trtllm: GPUs per node; one engine serves TP x PP GPUs of one node


# --------------------------------------------------------------------------------------------------
# Actor: the policy update (SPEC step 11)
# --------------------------------------------------------------------------------------------------
@dataclass
class ActorConfig:
    """Policy optimisation schedule and optimizer."""

    optimizer: str = "adamw"  # "adamw" or "sgd" (sgd: for exact parallel-layout checks)
    lr: float = 1e-6  # actor learning rate (track II: 1e-6)
    weight_decay: float = 0.01  # decoupled weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    clip_grad: float = 1.0  # global gradient-norm clip (0 = off)
    ppo_epochs: int = 1  # passes over each training batch
    num_mini_batches: int = 1  # optimizer steps per epoch (train batch / mini-batch; paper: 512 / 128 = 4)
    use_distributed_optimizer: bool = True  # GPU: megatron's distributed optimizer (ignored on CPU)
    logprob_chunk_size: int = 1024  # response positions per chunk of the log-prob/entropy pass (bounds the
    #   fp32 [chunk, V/TP] temporaries; forward and backward)
    reference_offload: bool = False  # keep the frozen reference policy's weights in CPU memory between uses
    release_for_rollout: bool = True  # while generating (rollouts, validation): optimizer state in (pinned) host
    #   memory, DDP gradient buffers freed, an on-GPU reference moved to the host; all back, bit for bit, before
    #   the log-prob passes (trainer/memory_release.py); the planner's rollout phase then holds none of them
    tis_cap: Optional[float] = None  # truncated importance sampling against the rollout engine's log-prob mismatch:
    #   each token's policy loss times min(exp(old_logp - rollout_logp), tis_cap) (policy_losses
    #   .truncated_importance_weights); null = off. Needs an engine that returns log-probs (trtllm)


# --------------------------------------------------------------------------------------------------
# Data, verifiers and evaluation (clipo_nemo.data, clipo_nemo.verifiers, clipo_nemo.trainer.evaluation)
# --------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Prompt files and how their rows become model input."""

    train_files: List[str] = field(default_factory=list)  # .parquet/.jsonl files (track I: train/gsm8k.parquet), datasets
    #   save_to_disk directories, or hub datasets hf:NAME[:CONFIG]:SPLIT read through the local datasets cache
    #   (HF_HUB_OFFLINE=1: the cache only; needs clipo-nemo[datasets]; clipo_nemo.data.hf_datasets)
    val_files: List[str] = field(default_factory=list)  # held-out sources scored during training, same forms (empty = none)
    prompt_key: str = "prompt"  # row field with the chat messages (or a plain string = one user message)
    answer_key: str = "reward_model.ground_truth"  # row field with the reference answer (dotted = nested)
    data_source_key: str = "data_source"  # row field naming the set; picks the verifier
    multiple_choice_sources: List[str] = field(
        default_factory=lambda: ["conrl/mmlu2k", "conrl/commonsense_qa", "conrl/truthfulqa"]
    )  # data sources checked by the multiple_choice verifier; all others use math
    max_prompt_length: int = 1024  # longest rendered prompt, in tokens
    truncation: str = "filter"  # over-long prompts: "filter" (drop and count) or "error" (the paper's setting)
    on_bad_row: str = "error"  # malformed rows: "error" (name file and row) or "skip" (drop and count)
    shuffle: bool = True  # a fresh seeded permutation of the prompts each epoch
    seed: int = 1234  # seeds the per-epoch permutations


@dataclass
class VerifierConfig:
    """The worker pool that turns responses into rewards."""

    timeout_s: float = 5.0  # hard limit per check; a check past it is killed and gets reward 0 ("timeout")
    num_workers: int = 0  # verifier processes per rank (0 = the CPUs divided by the ranks on the node, >= 1)
    max_memory_mb: int = 4096  # address-space limit per verifier process (0 = none)
    chunk_size: int = 32  # most checks handed to one worker at a time


@dataclass
class EvaluationConfig:
    """Benchmark evaluation (tools/evaluate.py and the trainer's periodic validation)."""

    data_dir: str = "../shared/data/clipo/test"  # folder with <benchmark>.parquet (.jsonl, or a save_to_disk directory)
    benchmarks: List[str] = field(
        default_factory=lambda: ["gsm8k", "gsm_symbolic", "gsm_p1", "gsm_p2", "commonsense_qa", "truthfulqa", "theoremqa", "mmlu2k"]
    )  # file stems to score (track II: math, math_perturb_simple, math_perturb_hard, amc, aime, aime2025), or hub
    #   datasets hf:NAME[:CONFIG]:SPLIT
    k: int = 1  # samples per problem; Pass@1 is their mean correctness (track I: 1, track II: 16)
    temperature: float = 0.6  # sampling temperature for evaluation; 0 = greedy (the samples of a problem are then
    #   identical: use k=1). The paper states 0.6; the authors' track I script validates greedily
    top_p: float = 0.95  # nucleus sampling for evaluation
    max_new_tokens: int = 2048  # response length cap for evaluation (track II: 4096)
    every_steps: int = 0  # run during training every this many steps (0 = never)
    out_dir: str = "outputs/eval"  # reports (Markdown, JSON, CSV) and per-problem results go here


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
@dataclass
class TinyTaskConfig:
    """The embedded default's synthetic task (clipo_nemo.data.tiny_task), generated into the run
    directory at start: train.parquet, heldout.parquet and, with ``perturbed``, heldout_perturbed.parquet;
    the held-out files are the validation benchmarks (``val/heldout/pass@1``, ``val/heldout_perturbed/pass@1``)."""

    enabled: bool = False  # true: train on the generated task instead of data.train_files/val_files
    max_operand: int = 4  # operands 0..max_operand; answers 0..3*max_operand with "chain", 0..2*max_operand with "+",
    #   else 0..max_operand
    operators: List[str] = field(default_factory=lambda: ["+", "-"])  # subset of "+", "-", "max", "min", "chain"
    val_fraction: float = 0.2  # share of the distinct problems held out for validation
    perturbed: bool = False  # also validate on the held-out problems reworded, with a distractor, with units
    seed: int = 0  # which problems go to which split
    # Supervised warm start before RL (operators [chain] only; the tiny_chain config): this many teacher-forced
    # steps of trainer.prompts_per_step x rollout.n demonstrations on training prompts, drawn with data.seed;
    # then the reference policy becomes the warm-started one. 0 = none. Not repeated on resume.
    warm_start_steps: int = 0
    # Shares of the demonstrations that are (correct derivations "s \boxed{t}", direct answers "\boxed{t}",
    # derivations with a wrong intermediate s and the right answer t): the last two are right answers by a wrong process
    warm_start_mix: List[float] = field(default_factory=lambda: [0.5, 0.35, 0.15])
    warm_start_recall: float = 0.3  # a direct demonstration holds the right answer with this probability, else a guess
    warm_start_lr: float = 2e-3  # the policy optimizer's learning rate during the warm start (actor.lr after it)


@dataclass
class WandbConfig:
    """Weights & Biases (``trainer.loggers`` includes ``wandb``; ``pip install 'clipo-nemo[trackers]'``)."""

    project: str = "clipo-nemo"  # W&B project
    entity: str = ""  # team or user ("" = the logged-in user's default entity)
    name: str = ""  # run display name ("" = the run directory's name)
    group: str = ""  # run group ("" = none), e.g. the seeds of one ablation
    tags: List[str] = field(default_factory=list)  # run tags
    mode: str = "online"  # "online" | "offline" (files under <run dir>/wandb, `wandb sync` uploads them later)


@dataclass
class MlflowConfig:
    """MLflow (``trainer.loggers`` includes ``mlflow``; ``pip install 'clipo-nemo[trackers]'``)."""

    tracking_uri: str = ""  # server URL or file store ("" = $MLFLOW_TRACKING_URI, else ./mlruns, a local file store)
    experiment: str = "clipo-nemo"  # experiment name (created when missing)
    run_name: str = ""  # run name ("" = the run directory's name)
    tags: Dict[str, str] = field(default_factory=dict)  # run tags


@dataclass
class TrainerConfig:
    """The training loop: length, batch, logging, checkpoints, robustness."""

    output_dir: str = "outputs/run"  # run directory: metrics, TensorBoard, plots, checkpoints; reused = resumed
    tokenizer: str = ""  # Hugging Face tokenizer directory, or "tiny" for the locally built tiny tokenizer
    #   ("" with a converted init_from: the checkpoint's own tokenizer/)
    init_from: str = ""  # starting weights ("" = random init, tiny only): a clipo-nemo run or one of its
    #   checkpoints/step_N (weights, reference, head), or a converted checkpoint (tools/convert_hf_to_megatron.py):
    #   its weights, its model.* description for every key left at its default, and its tokenizer
    max_steps: int = 100  # training steps (each: one batch of prompts x rollout.n responses)
    prompts_per_step: int = 128  # prompts per step over all DP ranks (paper: 512)
    save_every_steps: int = 50  # checkpoint interval (0 = only at the end and on SIGTERM/SIGINT)
    save_every_minutes: float = 0.0  # also save when this many minutes passed since the last save (or the
    #   start); checked after every step (0 = off). Bounds the work a crash or a missed time-limit save loses
    keep_last: int = 2  # complete checkpoints kept
    parallel_save: bool = True  # every data-parallel rank writes its share of a checkpoint (megatron's fully
    #   parallel save strategy); false: the DP-rank-0 copies write everything
    reshardable_optimizer_checkpoints: bool = False  # GPU (megatron distributed optimizer) only: save its state
    #   as megatron's "fully_reshardable" (loads at any TP/PP/DP, but gathered to DP rank 0 at save and read
    #   whole per TP shard at resume); false: "dp_reshardable" (every rank writes and reads only its own shard;
    #   loads at another DP, not at another TP/PP). Set it for the last save before changing TP/PP
    async_save: bool = False  # write checkpoints in a background process while training goes on; the
    #   checkpoint is published (meta.json, rename, `latest`) once written on every rank, at the latest
    #   by the next save or the end of the run
    max_consecutive_nonfinite: int = 3  # stop after this many steps in a row with a NaN/inf loss or gradient
    plot_embeddings: bool = True  # save head embeddings at the first and last step for the Figure-4 plot
    loggers: List[str] = field(default_factory=lambda: ["tensorboard"])  # experiment trackers besides
    #   metrics.jsonl (always written): any of "tensorboard", "wandb", "mlflow" (rank 0 logs; each gets the
    #   resolved config once, every metrics.jsonl value under its name, the plots as images; a resumed run
    #   continues the same W&B/MLflow run, ids kept in <run dir>/trackers.json)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # settings of the "wandb" logger
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)  # settings of the "mlflow" logger
    log_level: str = "info"  # "info": our start-up lines, the progress bar and the summary, with the library
    #   messages listed in clipo_nemo/console.py filtered out; "debug": those shown too (tools: --log-level)
    seed: int = 1234  # seeds rollouts and anything else stochastic in the loop
    gpu_memory_gib: float = 80.0  # per-GPU memory the layout planner checks the run against at start (0 = no check)
    node_ram_gib: float = 0.0  # host RAM per node the planner checks checkpoint save/resume against at start
    #   (0 = no check; tools/plan_layout.py prints the per-node figures)
    gpus_per_node: int = 8  # ranks per node, for the planner's per-node host-RAM figures
    require_init_from: bool = False  # true: refuse to start with an empty init_from (the tracks: never random init)
    allow_tokenizer_mismatch: bool = False  # true: train a converted init_from with a trainer.tokenizer whose
    #   vocabulary differs from the checkpoint's own tokenizer/ (the same ids then mean other words: only for a
    #   tokenizer known to be compatible); false: such a run is refused at start


# --------------------------------------------------------------------------------------------------
# Root
# --------------------------------------------------------------------------------------------------
@dataclass
class ClipoConfig:
    """Root of the configuration tree."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    task: TinyTaskConfig = field(default_factory=TinyTaskConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


def head_dim(model) -> int:
    """``d``, the size of one attention head: ``model.kv_channels``, or hidden size / heads."""
    return model.kv_channels or model.hidden_size // model.num_attention_heads


def max_sequence_length(cfg: ClipoConfig) -> int:
    """The longest row the trainer ever holds: the longest kept prompt plus the longest response."""
    return cfg.data.max_prompt_length + cfg.rollout.max_new_tokens


def unknown_keys(values: Mapping[str, Any], schema: type = ClipoConfig, prefix: str = "") -> List[str]:
    """The dotted keys of ``values`` (a plain nested dict, e.g. ``OmegaConf.to_container`` of a Hydra
    config) that ``schema``'s dataclasses do not declare. Hydra's ``+key=value`` adds keys past the
    structured schema, which ``OmegaConf.to_object`` then drops without a word."""
    types = get_type_hints(schema)
    unknown = []
    for key, value in values.items():
        if key not in types:
            unknown.append(f"{prefix}{key}")
        elif is_dataclass(types[key]) and isinstance(value, Mapping):
            unknown += unknown_keys(value, types[key], f"{prefix}{key}.")
    return unknown


def check_known_keys(values: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming every key of ``values`` the schema does not declare."""
    unknown = unknown_keys(values)
    if unknown:
        raise ConfigError(f"unknown configuration keys {unknown} (a typo? every key is documented in "
                          "clipo_nemo/config.py; '+key=value' cannot add new ones)")


def run_stamp() -> str:
    """``YYYYmmdd-HHMMSS-<host>-<pid>``, the ``${run_stamp:}`` of the example configs' default
    ``trainer.output_dir``: two runs started in the same second (on one host or several sharing a
    file system) still get different run directories (``${now:%Y%m%d-%H%M%S}`` gave them the same one).
    Under torchrun every rank resolves its own and rank 0's is used."""
    import os
    import socket
    import time

    return f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname().split('.')[0]}-{os.getpid()}"


def register_resolvers() -> None:
    """Register ``${run_stamp:}`` (:func:`run_stamp`) with OmegaConf (Hydra's entry point and
    :func:`load_config` call it)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ClipoConfig:
    """A YAML of ``examples/conf`` (or a run's ``config.yaml``) as a typed config, outside Hydra.

    Hydra-only keys (``defaults``, ``hydra``) are dropped, ``${now:...}`` resolves as under Hydra
    (and ``${run_stamp:}`` as under the entry point),
    and ``overrides`` are ``key=value`` strings applied last.
    """
    from datetime import datetime

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver("now", lambda pattern: datetime.now().strftime(pattern))
    register_resolvers()
    yaml = OmegaConf.load(path)
    for key in ("defaults", "hydra"):
        yaml.pop(key, None)
    merged = OmegaConf.merge(OmegaConf.structured(ClipoConfig), yaml, OmegaConf.from_dotlist(list(overrides)))
    return OmegaConf.to_object(merged)


# --------------------------------------------------------------------------------------------------
# Checks that span keys (run before any model is built)
# --------------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


# trainer.log_level's values (clipo_nemo.console applies them).
LOG_LEVELS = ("info", "debug")

# The model.* keys that fix a converted checkpoint's weights: a config may only repeat them.
ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "vocab_size", "rotary_base", "rope_scaling", "rope_scaling_factor",
                     "add_qkv_bias", "tie_word_embeddings", "norm_epsilon")


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def architecture_differences(model: ModelConfig, theirs: Mapping[str, Any]) -> List[str]:
    """``key: ours vs theirs`` for every architecture key (:data:`ARCHITECTURE_KEYS`) on which ``model``
    and another run's ``model`` section ``theirs`` differ (``kv_channels`` as the head size it implies;
    ``rope_scaling_factor`` only when RoPE is scaled). Keys ``theirs`` lacks are not compared."""
    ours_all, theirs_all = {k: getattr(model, k) for k in ARCHITECTURE_KEYS}, dict(theirs)
    differences = []
    for key in ARCHITECTURE_KEYS:
        if key not in theirs_all:
            continue
        ours, other = ours_all[key], theirs_all[key]
        if key == "kv_channels":
            ours, other = head_dim(model), head_dim(SimpleNamespace(**{**ours_all, **theirs_all}))
        if key == "rope_scaling_factor" and not (model.rope_scaling or theirs_all.get("rope_scaling")):
            continue
        if not _same(ours, other):
            differences.append(f"model.{key}={ours} now, {other} before")
    return differences


def apply_checkpoint_model(cfg: ClipoConfig, description: Dict[str, Any], source: str,
                           tokenizer_dir: Optional[str] = None) -> List[str]:
    """Fill ``cfg`` from a converted checkpoint: its model description (every ``model.*`` value) and
    its tokenizer directory. Pure; call before :func:`validate_config`.

    An architecture key (:data:`ARCHITECTURE_KEYS`) still at its schema default takes the checkpoint's
    value; set to anything else it must equal the checkpoint's value, or it is a :class:`ConfigError`
    naming the key and both values (``kv_channels`` is compared as the per-head size it implies;
    ``rope_scaling_factor`` counts only when the checkpoint scales RoPE). The other keys
    (params_dtype, max_position_embeddings, dropout, recompute, make_vocab_size_divisible_by,
    init_method_std) are run choices and stay as configured, defaults included (a bf16 checkpoint
    trains in fp32 unless ``model.params_dtype`` says otherwise). An empty ``trainer.tokenizer``
    becomes ``tokenizer_dir``. Returns ``key=value`` for every key filled.
    """
    model, defaults = cfg.model, ModelConfig()
    known = [f.name for f in fields(ModelConfig)]
    unknown, missing = sorted(set(description) - set(known)), sorted(set(known) - set(description))
    if unknown or missing:
        raise ConfigError(f"{source}: the checkpoint's model description does not fit this version's model.* keys "
                          f"(unknown {unknown}, missing {missing})")

    their_head_dim = head_dim(SimpleNamespace(**description))
    problems, filled = [], []
    for key in known:
        theirs, ours = description[key], getattr(model, key)
        if isinstance(getattr(defaults, key), float) and isinstance(theirs, int) and not isinstance(theirs, bool):
            theirs = float(theirs)
        if _same(ours, theirs):
            continue
        if key not in ARCHITECTURE_KEYS or (key == "rope_scaling_factor" and not description["rope_scaling"]):
            continue  # a run choice
        if key == "kv_channels" and ours is not None and ours == their_head_dim:
            continue
        if _same(ours, getattr(defaults, key)):
            setattr(model, key, theirs)
            filled.append(f"model.{key}={theirs}")
        else:
            implied = f" (head size {their_head_dim})" if key == "kv_channels" and theirs is None else ""
            problems.append(f"model.{key}={ours} contradicts the checkpoint's {key}={theirs}{implied}")
    if problems:
        raise ConfigError(f"trainer.init_from={source} is a converted checkpoint whose architecture the config "
                          "contradicts (leave these keys out, or set them to the checkpoint's values):\n  - "
                          + "\n  - ".join(problems))
    if not cfg.trainer.tokenizer and tokenizer_dir:
        cfg.trainer.tokenizer = str(tokenizer_dir)
        filled.append(f"trainer.tokenizer={tokenizer_dir}")
    return filled


def _anchor_problems(con: ContrastiveConfig, n: int, responses_per_step: int) -> List[str]:
    """Why no contrastive anchor could ever be valid (so the contrastive reward is always its offset),
    given ``n`` responses per group and ``responses_per_step`` in the batch; empty when one can be.

    An anchor needs a positive (another response with its correctness: of its own group at the
    ``group``/``cross`` levels, of the batch at ``batch``) and, with ``skip_trivial``, a negative among
    its candidates (its group at ``group``, the batch otherwise) - see clipo_nemo.algorithms.contrastive.
    """
    needed = 3 if con.skip_trivial else 2  # the anchor, a positive[, a negative]
    what = "a positive and a negative" if con.skip_trivial else "a positive"
    fix = "raise rollout.n, or set contrastive.enabled=false (plain RLVR)"
    if con.level in ("group", "cross") and n < 2:
        return [f"rollout.n={n} with contrastive.level={con.level}: an anchor's positives come from its own group, "
                f"which has no other member, so no anchor is ever valid and the contrastive reward is always "
                f"contrastive.reward_offset; {fix}"]
    if con.level == "group" and n < needed:
        return [f"rollout.n={n} with contrastive.level=group and contrastive.skip_trivial=true: an anchor needs "
                f"{what} among the one other member of its group, so no anchor is ever valid; {fix} "
                "(or set contrastive.skip_trivial=false)"]
    if responses_per_step < needed:
        return [f"{responses_per_step} responses per step (trainer.prompts_per_step x rollout.n) with "
                f"contrastive.level={con.level}: an anchor needs {what} among the others, so no anchor is ever "
                f"valid; {fix}"]
    return []


def _constant_reward_problems(con: ContrastiveConfig) -> List[str]:
    """Why the contrastive reward ``max(c - lambda * L, floor)`` (``max(c, floor)`` off the valid
    anchors) could never depend on the contrastive loss ``L >= 0``: empty when it can."""
    fix = "or set contrastive.enabled=false (plain RLVR)"
    if not con.reward_scale > 0:
        return [f"contrastive.reward_scale={con.reward_scale} must be > 0: at 0 every contrastive reward is "
                f"contrastive.reward_offset, below 0 a worse contrastive loss earns more; {fix}"]
    if not con.reward_floor < con.reward_offset:
        return [f"contrastive.reward_floor={con.reward_floor} must be below contrastive.reward_offset="
                f"{con.reward_offset}: c - lambda * L never exceeds the offset, so every contrastive reward would be "
                f"the floor (a sign slip? the default floor is -0.5); {fix}"]
    return []


def schema_problems(cfg: ClipoConfig, world_size: int = 1) -> List[str]:
    """Every value that cannot work, judged from the schema alone (ranges, cross-key arithmetic, the
    layout's divisibility), one message per problem naming the key. The checks that need the
    registries, the model tables or the file system are in :func:`clipo_nemo.validation.validate_config`,
    which calls this one."""
    problems = []

    def choice(key, value, options):
        if value not in options:
            problems.append(f"{key}={value!r} is not one of {sorted(options)}")

    def positive(key, value, allow_zero=False):
        if value < 0 or (value == 0 and not allow_zero):
            problems.append(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")

    algo, con, act, roll, trainer = cfg.algorithm, cfg.contrastive, cfg.actor, cfg.rollout, cfg.trainer
    choice("algorithm.kl_loss_type", algo.kl_loss_type, ("k1", "k2", "k3", "low_var_kl"))
    if not con.eps >= 0:
        problems.append(f"contrastive.eps={con.eps} must be >= 0")
    choice("contrastive.head.tp_mode", con.head.tp_mode, ("replicated", "column"))
    choice("actor.optimizer", act.optimizer, ("adamw", "sgd"))
    choice("trainer.log_level", trainer.log_level, LOG_LEVELS)
    for key, value in (("contrastive.temperature", con.temperature), ("contrastive.head.dim", con.head.dim),
                       ("actor.lr", act.lr), ("actor.ppo_epochs", act.ppo_epochs),
                       ("actor.num_mini_batches", act.num_mini_batches), ("rollout.n", roll.n),
                       ("rollout.max_new_tokens", roll.max_new_tokens), ("trainer.prompts_per_step", trainer.prompts_per_step),
                       ("trainer.max_consecutive_nonfinite", trainer.max_consecutive_nonfinite),
                       ("trainer.gpus_per_node", trainer.gpus_per_node),
                       ("actor.logprob_chunk_size", act.logprob_chunk_size),
                       ("parallel.micro_batch_size", cfg.parallel.micro_batch_size),
                       ("parallel.timeout_s", cfg.parallel.timeout_s)):
        positive(key, value)
    if not roll.temperature > 0:
        problems.append(f"rollout.temperature={roll.temperature} must be > 0: the update divides the policy's logits by "
                        "it to score the sampled tokens (greedy rollouts would also give every response of a group "
                        "the same tokens, hence zero advantage); for greedy evaluation set evaluation.temperature=0")
    for key, value in (("contrastive.warmup_steps", con.warmup_steps),
                       ("trainer.max_steps", trainer.max_steps), ("trainer.save_every_steps", trainer.save_every_steps),
                       ("trainer.save_every_minutes", trainer.save_every_minutes),
                       ("trainer.node_ram_gib", trainer.node_ram_gib),
                       ("parallel.max_tokens_per_micro_batch", cfg.parallel.max_tokens_per_micro_batch),
                       ("algorithm.kl_loss_coef", algo.kl_loss_coef), ("actor.clip_grad", act.clip_grad)):
        positive(key, value, allow_zero=True)
    if not 0 < roll.top_p <= 1:
        problems.append(f"rollout.top_p={roll.top_p} must be in (0, 1]")
    if algo.dual_clip_c is not None and algo.dual_clip_c <= 1:
        problems.append(f"algorithm.dual_clip_c={algo.dual_clip_c} must be > 1 (or null)")
    if act.optimizer == "sgd" and act.use_distributed_optimizer:
        problems.append("actor.optimizer=sgd needs actor.use_distributed_optimizer=false: megatron's distributed "
                        "optimizer supports Adam only (GPU runs)")
    choice("trainer.wandb.mode", trainer.wandb.mode, ("online", "offline"))
    if len(set(trainer.loggers)) < len(trainer.loggers):
        problems.append(f"trainer.loggers={list(trainer.loggers)} names a logger twice")
    if trainer.keep_last < 1:
        problems.append(f"trainer.keep_last={trainer.keep_last} must be >= 1")
    if cfg.model.params_dtype == "float16":
        problems.append("model.params_dtype='float16' is not supported: fp16 training needs dynamic loss scaling, "
                        "which is not wired to the policy loss here; use 'bfloat16' (same memory, no loss scaling)")
    stage_layers = cfg.model.num_layers // max(cfg.parallel.pipeline_parallel_size, 1)
    if cfg.model.recompute == "full" and (cfg.model.recompute_num_layers < 1
                                          or stage_layers % cfg.model.recompute_num_layers):
        problems.append(f"model.recompute_num_layers={cfg.model.recompute_num_layers} must be >= 1 and divide the "
                        f"{stage_layers} layers of a pipeline stage (recompute=full recomputes blocks of that many)")
    if roll.kv_cache_gb == "auto":
        if trainer.gpu_memory_gib <= 0:
            problems.append("rollout.kv_cache_gb=auto derives the budget from trainer.gpu_memory_gib, which is 0: "
                            "set the GPU's memory there or a number of GiB here")
    elif isinstance(roll.kv_cache_gb, str):
        problems.append(f"rollout.kv_cache_gb={roll.kv_cache_gb!r} must be a number of GiB or 'auto'")
    else:
        positive("rollout.kv_cache_gb", roll.kv_cache_gb)
    if roll.max_batch_size is not None and roll.max_batch_size < 1:
        problems.append(f"rollout.max_batch_size={roll.max_batch_size} must be >= 1 (or null: kv_cache_gb decides)")
    if roll.batching not in ("continuous", "static"):
        problems.append(f"rollout.batching={roll.batching!r} must be 'continuous' or 'static'")
    if roll.finish_check_every < 1:
        problems.append(f"rollout.finish_check_every={roll.finish_check_every} must be >= 1")
    if roll.engine == "trtllm":
        mp = cfg.parallel.tensor_parallel_size * cfg.parallel.pipeline_parallel_size
        if not 0 < roll.trtllm_kv_cache_fraction < 1:
            problems.append(f"rollout.trtllm_kv_cache_fraction={roll.trtllm_kv_cache_fraction} must lie in (0, 1)")
        positive("rollout.trtllm_refit_bucket_mb", roll.trtllm_refit_bucket_mb)
        positive("rollout.trtllm_kv_cache_gb", roll.trtllm_kv_cache_gb)
        positive("rollout.trtllm_refit_check_tolerance", roll.trtllm_refit_check_tolerance)
        if roll.trtllm_dtype not in ("bfloat16", "float16"):
            problems.append(f"rollout.trtllm_dtype={roll.trtllm_dtype!r}: TensorRT-LLM's engine serves 'bfloat16' or "
                            "'float16' (the refit casts the policy's weights)")
        if mp > roll.trtllm_gpus_per_node:
            problems.append(f"rollout.engine=trtllm runs one engine per model-parallel group on one node, but TP x PP "
                            f"= {mp} exceeds rollout.trtllm_gpus_per_node={roll.trtllm_gpus_per_node} (a group spanning "
                            "nodes would wait for GPUs its private Ray cluster does not have)")
        if cfg.model.num_attention_heads % mp:
            problems.append(f"rollout.engine=trtllm generates with tensor parallel = TP x PP = {mp}, which must divide "
                            f"model.num_attention_heads={cfg.model.num_attention_heads}")
    if act.tis_cap is not None:
        if not act.tis_cap >= 1:
            problems.append(f"actor.tis_cap={act.tis_cap} must be >= 1 (or null: no correction)")
        if roll.engine != "trtllm":
            problems.append(f"actor.tis_cap={act.tis_cap} corrects the rollout engine's log-probs against the trainer's, "
                            f"but rollout.engine={roll.engine} generates with the trainer's own model and returns none; "
                            "leave it null")
    if cfg.parallel.context_parallel_size > 1 and roll.engine == "megatron":
        problems.append(f"parallel.context_parallel_size={cfg.parallel.context_parallel_size} cannot be served by "
                        "rollout.engine=megatron: its KV-cached decoding feeds whole sequences to each rank "
                        "(megatron's static inference context has no context-parallel split); use CP=1")
    task = cfg.task
    if task.warm_start_steps < 0:
        problems.append(f"task.warm_start_steps={task.warm_start_steps} must be >= 0")
    if task.warm_start_steps > 0 and list(task.operators) != ["chain"]:
        problems.append(f"task.warm_start_steps={task.warm_start_steps} needs task.operators=[chain] (its "
                        f"demonstrations are chain derivations), got {list(task.operators)}")
    if len(task.warm_start_mix) != 3 or any(not w >= 0 for w in task.warm_start_mix) or not sum(task.warm_start_mix) > 0:
        problems.append(f"task.warm_start_mix={list(task.warm_start_mix)} must be three shares >= 0 (derivation, "
                        "direct, inconsistent) with a positive sum")
    if not task.warm_start_lr > 0:
        problems.append(f"task.warm_start_lr={task.warm_start_lr} must be > 0")
    if not 0 <= task.warm_start_recall <= 1:
        problems.append(f"task.warm_start_recall={task.warm_start_recall} must lie in [0, 1]")
    if not cfg.task.enabled and not cfg.data.train_files:
        problems.append("data.train_files is empty and task.enabled=false: there is nothing to train on")
    if trainer.require_init_from and not trainer.init_from:
        problems.append("trainer.init_from is empty, but this config sets trainer.require_init_from=true: give the "
                        "starting weights (trainer.init_from=CKPT: a checkpoint converted by "
                        "tools/convert_hf_to_megatron.py, or a clipo-nemo run) instead of training from random init")
    if con.enabled:
        problems += _anchor_problems(con, roll.n, trainer.prompts_per_step * roll.n) + _constant_reward_problems(con)
    ev, data, verifier = cfg.evaluation, cfg.data, cfg.verifier
    for key, value in (("verifier.timeout_s", verifier.timeout_s), ("verifier.chunk_size", verifier.chunk_size),
                       ("evaluation.k", ev.k), ("evaluation.max_new_tokens", ev.max_new_tokens),
                       ("data.max_prompt_length", data.max_prompt_length)):
        positive(key, value)
    for key, value in (("verifier.num_workers", verifier.num_workers), ("verifier.max_memory_mb", verifier.max_memory_mb),
                       ("evaluation.every_steps", ev.every_steps), ("evaluation.temperature", ev.temperature)):
        positive(key, value, allow_zero=True)
    if not 0 < ev.top_p <= 1:
        problems.append(f"evaluation.top_p={ev.top_p} must be in (0, 1]")
    positions = cfg.model.max_position_embeddings
    for new_tokens_key, new_tokens in (("rollout.max_new_tokens", roll.max_new_tokens),
                                       ("evaluation.max_new_tokens", ev.max_new_tokens)):
        if data.max_prompt_length + new_tokens > positions:
            problems.append(f"data.max_prompt_length={data.max_prompt_length} + {new_tokens_key}={new_tokens} = "
                            f"{data.max_prompt_length + new_tokens} tokens exceeds model.max_position_embeddings="
                            f"{positions}: the longest prompt plus response must fit the model")
    if not trainer.tokenizer:
        problems.append("trainer.tokenizer is empty: give a Hugging Face tokenizer directory (or 'tiny'), or start "
                        "from a converted checkpoint that carries one (trainer.init_from)")
    mp = cfg.parallel.tensor_parallel_size * cfg.parallel.pipeline_parallel_size * cfg.parallel.context_parallel_size
    dp = max(world_size // max(mp, 1), 1)
    responses = trainer.prompts_per_step * roll.n
    if trainer.prompts_per_step < 1 or act.num_mini_batches < 1:
        pass  # already reported above; the divisibility checks below need both >= 1
    elif trainer.prompts_per_step % dp:
        problems.append(f"trainer.prompts_per_step={trainer.prompts_per_step} must divide by the data-parallel size {dp}")
    elif cfg.parallel.max_tokens_per_micro_batch > 0 and (responses // dp) % act.num_mini_batches:
        problems.append(f"responses per DP rank ({responses} / {dp}) must divide into actor.num_mini_batches="
                        f"{act.num_mini_batches} mini-batches (micro-batches are packed by "
                        f"parallel.max_tokens_per_micro_batch={cfg.parallel.max_tokens_per_micro_batch})")
    elif cfg.parallel.max_tokens_per_micro_batch == 0 and cfg.parallel.micro_batch_size > 0 and (
            (responses // dp) % (act.num_mini_batches * cfg.parallel.micro_batch_size)):
        problems.append(f"responses per DP rank ({responses} / {dp}) must divide into actor.num_mini_batches="
                        f"{act.num_mini_batches} mini-batches of whole parallel.micro_batch_size="
                        f"{cfg.parallel.micro_batch_size} micro-batches")
    return problems
