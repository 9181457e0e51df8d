"""The GRPO + CLIPO training run.

Each step, on every rank together::

    sample prompts -> rollouts (n per prompt) -> verify -> learn_from_experience
      (old log-probs + pooled hidden in one forward -> reference log-probs -> contrastive reward ->
       advantages -> policy update, or only the head during warm-up)
    -> metrics -> periodic validation -> checkpoint

Data parallel: the step's prompts are dealt to DP ranks in contiguous blocks; every rank generates,
verifies and learns from its own share. TP/PP ranks of one model replica share their prompts.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from clipo_nemo.algorithms.advantages import zero_variance_groups
from clipo_nemo.config import ClipoConfig, apply_checkpoint_model
from clipo_nemo.console import say
from clipo_nemo.validation import validate_config
from clipo_nemo.data.prompts import Prompt
from clipo_nemo.parallel.gather import all_reduce_values, broadcast_object
from clipo_nemo.trainer.run_report import describe_run, memory_line, next_steps
from clipo_nemo.trainer.experience import (Rollouts, SampledGroup, build_experience, engine_generate_fn, generate,
                                           logprob_mismatch_metrics, rollout_logprobs, verify)
from clipo_nemo.trainer.memory_release import training_state_released
from clipo_nemo.trainer.step import ClipoHead, learn_from_experience


STOP_WARNING_ENV = "CLIPO_STOP_WARNING_S"  # set by the SLURM scripts to their --signal=B:USR1@<s>


class StopRequested:
    """Set by SIGTERM, SIGINT or SIGUSR1 (SLURM's ``--signal=USR1@<s>`` warning before the time limit):
    the loop saves the last completed step and exits cleanly (status 0). A request that arrives
    during a step's rollouts abandons that step (its prompts are drawn again after the resume, nothing
    is trained on them); one during the update lets the step finish; validation is skipped.

    A second SIGINT (Ctrl-C twice) stops at once. Repeated SIGTERM/SIGUSR1 are ignored: a scheduler may
    deliver one request to every process of a job step and the launcher forwards it too
    (``python -m clipo_nemo.parallel.launcher``), so one request can arrive more than once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.signal: Optional[int] = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = self.signal or signum

    def any_rank(self) -> bool:
        """Whether any rank was signalled (all ranks must stop at the same step)."""
        return all_reduce_values([float(self.signal is not None)], op=dist.ReduceOp.MAX)[0] > 0


# --------------------------------------------------------------------------------------------------
# Data and rollouts
# --------------------------------------------------------------------------------------------------
def load_tokenizer(cfg: ClipoConfig):
    if cfg.trainer.tokenizer == "tiny":
        from clipo_nemo.data.tiny_tokenizer import build_task_tokenizer

        return build_task_tokenizer(cfg.task)
    from transformers import AutoTokenizer

    if not Path(cfg.trainer.tokenizer).is_dir():
        raise FileNotFoundError(f"trainer.tokenizer={cfg.trainer.tokenizer!r} is not a directory with a tokenizer")
    return AutoTokenizer.from_pretrained(cfg.trainer.tokenizer)


def task_splits(cfg: ClipoConfig, run_dir: Path) -> (Path, List[str]):
    """Where a ``task.enabled`` run keeps its generated task (``<run dir>/data``) and the split names:
    ``train``, ``heldout`` and, with ``task.perturbed``, ``heldout_perturbed`` (``<split>.parquet``)."""
    return run_dir / "data", ["train", "heldout"] + (["heldout_perturbed"] if cfg.task.perturbed else [])


def prepare_task_files(cfg: ClipoConfig, run_dir: Path) -> None:
    """With ``task.enabled``, generate the tiny task into the run directory, train on its train split
    and validate on its held-out splits (:func:`task_splits`)."""
    if not cfg.task.enabled:
        return
    from clipo_nemo.data.tiny_task import write_tiny_arith_parquet

    out, splits = task_splits(cfg, run_dir)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_tiny_arith_parquet(out, max_operand=cfg.task.max_operand, operators=tuple(cfg.task.operators),
                                 val_fraction=cfg.task.val_fraction, seed=cfg.task.seed, perturbed=cfg.task.perturbed)
    if dist.is_initialized():
        dist.barrier()
    cfg.data.train_files, cfg.data.val_files = [str(out / "train.parquet")], [str(out / f"{s}.parquet") for s in splits[1:]]


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
class Trainer:
    """Builds everything for ``cfg`` on an initialised parallel state and runs the loop."""

    def __init__(self, cfg: ClipoConfig, run_dir: Path):
        from megatron.core import parallel_state

        from clipo_nemo.data.prompts import load_prompt_set
        from clipo_nemo.data.sampler import EpochSampler
        from clipo_nemo.rollout import GenerationParams, build_rollout_engine
        from clipo_nemo.trainer.actor import Actor
        from clipo_nemo.verifiers.pool import VerifierPool

        self.cfg, self.run_dir = cfg, run_dir
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.is_logger = not dist.is_initialized() or dist.get_rank() == 0
        prepare_task_files(cfg, run_dir)
        self.tokenizer = load_tokenizer(cfg)
        if len(self.tokenizer) > cfg.model.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but model.vocab_size={cfg.model.vocab_size}: "
                             "every token id must have an embedding row")
        self.train_set = load_prompt_set(cfg.data.train_files, cfg.data, self.tokenizer)
        self.val_set = load_prompt_set(cfg.data.val_files, cfg.data, self.tokenizer) if cfg.data.val_files else None
        if len(self.train_set.prompts) < cfg.trainer.prompts_per_step:
            raise ValueError(f"{len(self.train_set.prompts)} usable training prompts (of {cfg.data.train_files}) "
                             f"cannot fill trainer.prompts_per_step={cfg.trainer.prompts_per_step}")
        self.sampler = EpochSampler(len(self.train_set.prompts), cfg.trainer.prompts_per_step, cfg.data.seed,
                                    cfg.data.shuffle)
        self.actor = Actor.build(cfg)
        self.actor.sync_reference()
        self.clipo = ClipoHead.build(cfg) if cfg.contrastive.enabled else None
        self.engine = build_rollout_engine(cfg.rollout, model=self.actor.module, tokenizer=self.tokenizer, cfg=cfg)
        self.train_params = GenerationParams.from_config(cfg.rollout)
        self.pool = VerifierPool(cfg.verifier.num_workers, cfg.verifier.timeout_s, cfg.verifier.max_memory_mb,
                                 cfg.verifier.chunk_size)
        self.chain_task = cfg.task.enabled and "chain" in cfg.task.operators  # tiny_chain's path metrics
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.weights_check = None  # the load guard's report (clipo_nemo.checkpoint.load_guard), set by run()
        self.old_checkpoints: List[Path] = []  # step_N directories found at resume: never saved over (set aside)
        self.kept_checkpoints: List[Path] = []  # never pruned: the old checkpoints when resume fell back
        self.stop: Optional[StopRequested] = None  # set by run(): checked between a step's phases
        self.last_save = (time.monotonic(), -1)  # (when, which step) the last checkpoint was saved (-1: none yet)
        self.longest_stop_s = 0.0  # the longest a stop request has had to wait for a phase to end (measured)

    # ----------------------------------------------------------------------------------------------
    def _my_prompts(self, indices: List[int]):
        per_rank = len(indices) // self.dp_size
        start = self.dp_rank * per_rank
        return [self.train_set.prompts[i] for i in indices[start:start + per_rank]], start

    def _collect(self, step: int) -> (List["SampledGroup"], Dict[str, float]):
        """Rollouts and verification for this step; with dynamic sampling, groups whose rewards are all
        equal are dropped and more prompts are drawn (up to ``dynamic_sampling_max_batches``) to refill
        this rank's share. A rank still short after that keeps zero-variance groups (zero advantage)."""
        cfg, n = self.cfg, self.cfg.rollout.n
        dynamic = cfg.algorithm.dynamic_sampling
        wanted = cfg.trainer.prompts_per_step // self.dp_size
        kept: List[SampledGroup] = []
        flat: List[SampledGroup] = []
        info = {"rollout_s": 0.0, "verify_s": 0.0, "batches": 0}
        for attempt in range(cfg.algorithm.dynamic_sampling_max_batches if dynamic else 1):
            prompts, offset = self._my_prompts(self.sampler.next_batch())
            seeds = [cfg.rollout.seed + (step * 1_000_003 + attempt * 10_007 + offset + i) for i in range(len(prompts))]
            clock = time.perf_counter()
            rollouts = generate(self.engine, [p.token_ids for p in prompts], self.train_params, seeds)
            info["rollout_s"] += time.perf_counter() - clock
            if self.stop is not None and self.stop.any_rank():
                return None, info  # a stop request during the rollouts: abandon the step
            clock = time.perf_counter()
            scores, reasons = self._verified(prompts, rollouts)
            info["verify_s"] += time.perf_counter() - clock
            info["batches"] += 1
            for g, prompt in enumerate(prompts):
                part = slice(g * n, (g + 1) * n)
                group = SampledGroup(prompt, rollouts.response_ids[part], rollouts.finish_reasons[part], scores[part],
                                     reasons[part], rollouts.logprobs[part] if rollouts.logprobs is not None else None)
                no_signal = dynamic and bool(zero_variance_groups(group.scores, torch.zeros(n, dtype=torch.long)).all())
                (flat if no_signal else kept).append(group)
            # Every rank draws the same number of batches (the sampler stays in step across ranks).
            if not all_reduce_values([float(len(kept) < wanted)], op=dist.ReduceOp.MAX)[0]:
                break
        info["zero_variance_groups"] = len(flat)
        info["filler_groups"] = max(wanted - len(kept), 0)
        return (kept + flat)[:wanted], info

    def _verified(self, prompts, rollouts):
        """Verify on the first rank of each model replica and share the result with its TP/PP peers."""
        from megatron.core import parallel_state

        group = parallel_state.get_model_parallel_group()
        result = None
        if dist.get_rank(group) == 0:
            result = verify(self.pool, self.tokenizer, prompts, rollouts, self.cfg.rollout.n)
        return broadcast_object(result, dist.get_global_rank(group, 0), group)

    def train_one_step(self) -> Optional[Dict[str, float]]:
        """One step's rollouts, verification and update; None when a stop request arrived during the
        rollouts (nothing was trained; the sampler is back where the step started)."""
        cfg, n, step = self.cfg, self.cfg.rollout.n, self.step
        clock = time.perf_counter()
        sampler_at_start = self.sampler.state_dict()
        with training_state_released(self.actor, cfg.actor.release_for_rollout):
            groups, info = self._collect(step)
        if groups is None:
            self.sampler.load_state_dict(sampler_at_start)
            return None
        rollouts = Rollouts([list(g.prompt.token_ids) for g in groups for _ in range(n)],
                            [r for g in groups for r in g.responses], [f for g in groups for f in g.finish_reasons])
        scores = torch.cat([g.scores for g in groups])
        first_group = self.dp_rank * len(groups)
        exp, empty = build_experience(rollouts, scores, first_group, first_group * n, n,
                                      self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        exp.rollout_logprobs = rollout_logprobs(groups, exp)
        if hasattr(self.engine, "release"):  # the engine's KV cache and weights sleep while training
            self.engine.release()
        out = learn_from_experience(self.actor, self.clipo, exp, cfg, step)
        from megatron.core import parallel_state

        reasons = [r for g in groups for r in g.reasons]
        counts = {  # summed over DP ranks
            "responses": len(reasons), "rollout/empty_responses": empty,
            "tokens": exp.response_mask.sum().item(), "truncated": sum(f == "length" for f in rollouts.finish_reasons),
            "dynamic_sampling/zero_variance_groups": info["zero_variance_groups"],
            "dynamic_sampling/filler_groups": info["filler_groups"],
            **{f"verifier/{code}": sum(r == code for r in reasons) for code in REASON_CODES},
        }
        counts = dict(zip(counts, all_reduce_values(list(counts.values()), parallel_state.get_data_parallel_group())))
        responses = max(counts.pop("responses"), 1.0)
        metrics = {**out.metrics,
                   "rollout/response_length_mean": counts.pop("tokens") / responses,
                   "rollout/truncated_frac": counts.pop("truncated") / responses, **counts,
                   "time/rollout_s": info["rollout_s"], "time/verify_s": info["verify_s"],
                   "dynamic_sampling/rollout_batches": float(info["batches"])}
        if exp.rollout_logprobs is not None:
            metrics.update(logprob_mismatch_metrics(exp, out.old_logprobs))
        if self.chain_task:  # the tiny_chain task's mechanism metrics
            from clipo_nemo.trainer.chain_task import chain_metrics, question_of

            metrics.update(chain_metrics([question_of(g.prompt) for g in groups for _ in range(n)],
                                         self.tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True),
                                         scores > 0, out.contrastive_rewards))
        metrics["step_time_s"] = time.perf_counter() - clock
        if cfg.trainer.plot_embeddings and out.head_embeddings is not None and (
                step == 0 or step == cfg.trainer.max_steps - 1):
            self._save_embeddings(step, out)
        return metrics

    def _save_embeddings(self, step: int, out) -> None:
        from megatron.core import parallel_state

        if self.cfg.contrastive.head.tp_mode == "column" and parallel_state.get_tensor_model_parallel_world_size() > 1:
            return  # each TP rank holds a slice; the plot uses whole embeddings
        if parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0:
            path = self.run_dir / "embeddings" / f"step_{step}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            # Canonical order: the global batch's n responses per prompt, one prompt after another.
            group_ids = torch.arange(len(out.global_correct)) // self.cfg.rollout.n
            torch.save({"embeddings": out.head_embeddings.cpu(), "correct": out.global_correct.cpu(),
                        "group_ids": group_ids}, path)

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> Dict[str, float]:
        """Pass@1 on the validation files with the ``evaluation`` sampling settings, through the same
        code as ``tools/evaluate.py``; each DP rank scores its share and the results are gathered."""
        from megatron.core import parallel_state

        from clipo_nemo.trainer import evaluation

        ev = self.cfg.evaluation
        mine = self.val_set.prompts[self.dp_rank::self.dp_size]
        prompt_sets: Dict[str, List[Prompt]] = {}
        for prompt in mine:
            prompt_sets.setdefault(Path(prompt.problem.source_file).stem, []).append(prompt)
        generate_fn = engine_generate_fn(self.engine, self.tokenizer, mine, self.train_params, ev.max_new_tokens,
                                         self.cfg.rollout.seed + 7_777_777 + self.dp_rank * 100_003)
        if self.chain_task:  # the tiny_chain task's Pass@1 per reasoning path needs the samples themselves
            from clipo_nemo.trainer.chain_task import chain_validation_metrics, recording

            samples: Dict[str, List[str]] = {}
            generate_fn = recording(generate_fn, samples)
        with training_state_released(self.actor, self.cfg.actor.release_for_rollout):
            results = evaluation.evaluate(generate_fn, prompt_sets, self.pool, ev.k, ev.temperature, ev.top_p)
        chain_flat = chain_validation_metrics(sorted(Path(f).stem for f in self.cfg.data.val_files), prompt_sets,
                                              samples, results) if self.chain_task else {}
        if dist.is_initialized():
            gathered = [None] * self.dp_size
            dist.all_gather_object(gathered, results, group=parallel_state.get_data_parallel_group())
            results = [r for part in gathered for r in part]
        return {**evaluation.metrics(evaluation.summarize(results)), **chain_flat}

    # ----------------------------------------------------------------------------------------------
    def run(self, stop: Optional[StopRequested] = None) -> Dict[str, object]:
        """Resume if the run directory has a checkpoint, train to ``trainer.max_steps``, save, plot.
        ``stop``: a handler installed earlier (so a signal during the build is not lost)."""
        from clipo_nemo.checkpoint.load import load_checkpoint
        from clipo_nemo.checkpoint.reference import pointer_for_run
        from clipo_nemo.checkpoint.save import finish_saves, wait_for_pending_save
        from clipo_nemo.trainer.metrics import MetricsLogger
        from clipo_nemo.trainer.trackers import build_trackers

        cfg = self.cfg
        point = self._resume_point()
        self.old_checkpoints = point.old_checkpoints
        self.kept_checkpoints = point.old_checkpoints if point.fell_back else []
        state = None if point.checkpoint is None else load_checkpoint(
            str(self.run_dir), self.actor, self.clipo, path=point.checkpoint, verify=False)
        if state is not None:
            self.step = state["step"]
            self.sampler.load_state_dict(state["sampler"])
        elif cfg.trainer.init_from:
            self._init_from(Path(cfg.trainer.init_from))
        warm_note = None
        if state is None and cfg.task.enabled and cfg.task.warm_start_steps > 0:
            from clipo_nemo.trainer.chain_task import warm_start

            warm_note = warm_start(self.actor, self.train_set.prompts, self.tokenizer, cfg, self.dp_rank, self.dp_size)
        weights_note = self._check_optimizer_copies()
        self.reference_pointer = None if self.actor.reference is None else pointer_for_run(
            point.checkpoint if state is not None else None, cfg.trainer.init_from)
        logger = MetricsLogger(str(self.run_dir), cfg.trainer.max_steps, self.step, self.is_logger,
                               build_trackers(cfg, self.run_dir, self.step) if self.is_logger else ())
        for note in point.notes:
            logger.note(note)
        if state is not None:
            logger.note(f"resumed from {point.checkpoint} at step {self.step}")
        elif cfg.trainer.init_from:
            logger.note(f"initialised from {cfg.trainer.init_from}")
        if warm_note:
            logger.note(warm_note)
        if state is not None or cfg.trainer.init_from or self.weights_check.reloaded:
            logger.note(weights_note)  # what the load guard found (a fresh run loads nothing)
        data_lines, data_counts = self._data_report()
        for line in data_lines:
            logger.note(line)
        stop = self.stop = stop or StopRequested()
        self.last_save = (time.monotonic(), state["step"] if state is not None else -1)
        status = "completed"
        logger.start()  # the progress bar, below the start-up lines
        try:
            while self.step < cfg.trainer.max_steps:
                metrics = self.train_one_step()
                if metrics is None:
                    status = f"stopped by signal (step {self.step} abandoned during its rollouts)"
                    break
                self.longest_stop_s = max(self.longest_stop_s, metrics["time/rollout_s"],
                                          metrics["step_time_s"] - metrics["time/rollout_s"])
                if metrics.get("update_skipped", 0.0) > 0 or not all(
                        v == v and abs(v) != float("inf") for k, v in metrics.items() if "loss" in k):
                    self.nonfinite_in_a_row += 1
                    metrics["nonfinite_steps_in_a_row"] = float(self.nonfinite_in_a_row)
                else:
                    self.nonfinite_in_a_row = 0
                if self.val_set is not None and cfg.evaluation.every_steps and (
                        (self.step + 1) % cfg.evaluation.every_steps == 0 or self.step == 0):
                    if stop.any_rank():
                        logger.note(f"validation of step {self.step} skipped: stop requested")
                    else:
                        metrics.update(self.validate())
                metrics.update(data_counts)  # the first step this process logs carries the data counts
                data_counts = {}
                logger.log(self.step, metrics)
                self.step += 1
                if self.nonfinite_in_a_row >= cfg.trainer.max_consecutive_nonfinite:
                    status = f"stopped: {self.nonfinite_in_a_row} steps in a row with a non-finite loss or gradient"
                    break
                if stop.any_rank():
                    status = "stopped by signal"
                    break
                finish_saves()  # publish a background save that every rank has written
                if self._save_due() and self.step < cfg.trainer.max_steps:
                    self._save(logger)
            # A diverged policy is not saved over the last good one; a step already saved is not saved again.
            if not status.startswith("stopped:") and self.step != self.last_save[1]:
                self._save(logger)
            wait_for_pending_save()  # a background save is complete and published before exit
        finally:
            self.pool.close()
        summary = logger.close(status, self._plots(logger.history) if self.is_logger else None)
        if self.is_logger:
            counts = "\n".join(line for line in data_lines if line.startswith("data "))
            after = "\n".join(next_steps(cfg, self.run_dir))
            print(f"\n== clipo-nemo run {status} ==\nrun directory: {self.run_dir}\n{counts}\n{summary}\n{after}",
                  flush=True)
        return {"status": status, "step": self.step, "history": logger.history}

    def _data_report(self) -> (List[str], Dict[str, float]):
        """Log lines and metrics for the prompts kept and the rows dropped (bad rows skipped with
        ``data.on_bad_row=skip``, prompts over ``data.max_prompt_length``) of each split."""
        splits = {"train": self.train_set, "val": self.val_set}
        lines = [line for split, prompts in splits.items() if prompts is not None for line in prompts.report(split)]
        counts = {key: float(value) for split, prompts in splits.items() if prompts is not None
                  for key, value in prompts.metrics(split).items()}
        return lines, counts

    def _init_from(self, source: Path) -> None:
        """A fresh run (step 0) from other weights: a converted checkpoint (policy, and the reference
        made equal to it; the head stays freshly initialised) or another run's checkpoint (its weights,
        reference, head and optimizer states; its step is not kept)."""
        from clipo_nemo.checkpoint.load import load_checkpoint
        from clipo_nemo.checkpoint.recovery import CheckpointError
        from clipo_nemo.conversion.weights import is_weights_checkpoint, load_weights_into_model

        if is_weights_checkpoint(source):
            load_weights_into_model(self.actor.module, source, self.cfg.model.vocab_size)
            self.actor.sync_reference()
            return
        is_step_dir = source.parent.name == "checkpoints"
        if load_checkpoint(str(source.parent.parent if is_step_dir else source), self.actor, self.clipo,
                           path=source if is_step_dir else None) is None:
            raise CheckpointError(f"trainer.init_from={source}: the run has no complete checkpoint")

    def _check_optimizer_copies(self) -> str:
        """After any load: the optimizers' copies of the weights must be the models' (stale megatron main
        copies are reloaded), or the first step would undo the load. Raises StaleOptimizerError."""
        from clipo_nemo.checkpoint.load_guard import sync_optimizer_with_model

        self.weights_check = sync_optimizer_with_model(self.actor.optimizer, self.actor.model)
        checked = self.weights_check.tensors_checked
        if self.clipo is not None and self.clipo.optimizer is not None:
            checked += sync_optimizer_with_model(self.clipo.optimizer, self.clipo.head).tensors_checked
        reloaded = ", stale main copies reloaded from the model" if self.weights_check.reloaded else ""
        return f"optimizer copies of the weights equal the model's ({checked} tensors on this rank{reloaded})"

    def _resume_point(self):
        """Where to resume (:func:`clipo_nemo.checkpoint.shared_verify.resume_point_together`: every rank
        verifies its share, all agree). A run directory with checkpoints none of which loads, or with
        logged steps and no checkpoint, is a CheckpointError on every rank (never a fresh start over its files)."""
        from clipo_nemo.checkpoint.shared_verify import resume_point_together

        return resume_point_together(self.run_dir)

    def _save_due(self) -> bool:
        """``trainer.save_every_steps`` reached, or ``trainer.save_every_minutes`` passed since the last
        save (rank 0's clock decides, so every rank agrees)."""
        trainer = self.cfg.trainer
        if trainer.save_every_steps and self.step % trainer.save_every_steps == 0:
            return True
        if not trainer.save_every_minutes:
            return False
        late = time.monotonic() - self.last_save[0] >= 60 * trainer.save_every_minutes
        return broadcast_object(late, src=0)

    def _save(self, logger) -> None:
        from clipo_nemo.checkpoint import recovery, save

        start = time.monotonic()

        target = recovery.checkpoints_dir(self.run_dir) / f"step_{self.step}"
        if self.is_logger and target in self.old_checkpoints and target.is_dir():
            moved = recovery.set_aside(target)  # an old checkpoint (skipped at resume) is kept, not replaced
            logger.note(f"{target.name} of the earlier run moved to {moved.name} before saving step {self.step}")
        try:
            save.save_checkpoint(str(self.run_dir), self.step, self.actor, self.clipo,
                                 {"step": self.step, "sampler": self.sampler.state_dict()},
                                 keep_last=self.cfg.trainer.keep_last, keep=self.kept_checkpoints,
                                 reference=self.reference_pointer, parallel=self.cfg.trainer.parallel_save,
                                 asynchronous=self.cfg.trainer.async_save)
        except BaseException as err:  # torch's CheckpointException (a failed write) is a BaseException
            no_space = None if isinstance(err, (KeyboardInterrupt, SystemExit)) else \
                save.out_of_space(err, self.run_dir, self.step)
            if no_space is None:
                raise
            raise no_space from err
        save_s = time.monotonic() - start
        self.last_save = (time.monotonic(), self.step)
        warning_s = float(os.environ.get(STOP_WARNING_ENV, "0") or 0)
        if warning_s and self.longest_stop_s + save_s > warning_s:
            logger.note(f"{STOP_WARNING_ENV}={warning_s:g} s (the scheduler's warning before the time limit) is "
                        f"shorter than a stop can take here: {self.longest_stop_s:.0f} s for the longest rollout or "
                        f"update phase + {save_s:.0f} s for this save; raise --signal=B:USR1@<s> (README: Clusters)")

    def _plots(self, history) -> Dict[str, Path]:
        """Write the run's plots; returns name -> PNG path."""
        from clipo_nemo.trainer.plots import plot_embeddings, plot_training_curves

        written = {}
        if history:
            written["training_curves"] = self.run_dir / "training_curves.png"
            plot_training_curves(history, written["training_curves"])
        snapshots = sorted((self.run_dir / "embeddings").glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        if len(snapshots) >= 1:
            chosen = {f"head embeddings, step {p.stem.split('_')[1]}": torch.load(p) for p in (snapshots[0], snapshots[-1])}
            written["embeddings"] = self.run_dir / "embeddings.png"
            plot_embeddings(chosen, written["embeddings"])
        return written


REASON_CODES = ("ok", "wrong", "empty", "no_box", "parse_error", "timeout", "error")


def use_converted_checkpoint(cfg: ClipoConfig) -> List[str]:
    """With a converted checkpoint as ``trainer.init_from``: take its architecture for every
    ``model.*`` architecture key left at its default (a contradicting one is a ConfigError), and its
    tokenizer when ``trainer.tokenizer`` is empty (:func:`clipo_nemo.config.apply_checkpoint_model`).
    Returns the keys it set."""
    from clipo_nemo.conversion.weights import is_weights_checkpoint, read_description, tokenizer_dir

    source = cfg.trainer.init_from
    if not source or not is_weights_checkpoint(source):
        return []
    return apply_checkpoint_model(cfg, read_description(source)["model"], source, tokenizer_dir(source))


def train(cfg: ClipoConfig) -> Dict[str, object]:
    """Validate ``cfg``, set up the process groups, train, tear down. The Hydra entry point calls this."""
    from clipo_nemo.parallel.state import destroy_parallel_state, init_parallel_state, validate_layout
    from clipo_nemo.planner import check_memory_plan
    from clipo_nemo.planner.host_memory import check_host_memory

    stop = StopRequested()  # first: a stop request while the model is built is kept for the first step
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    filled = use_converted_checkpoint(cfg)
    if filled:
        say(f"trainer.init_from={cfg.trainer.init_from} sets " + ", ".join(filled))
    validate_config(cfg, world_size)
    validate_layout(world_size, cfg.model, cfg.parallel,
                    batch_size=cfg.trainer.prompts_per_step * cfg.rollout.n, group_size=cfg.rollout.n)
    # Before anything is built: refuse a layout whose planned peak exceeds trainer.gpu_memory_gib.
    on_gpu = torch.cuda.is_available()
    plan = check_memory_plan(cfg, world_size, on_gpu=on_gpu)
    if cfg.rollout.kv_cache_gb == "auto":  # validate_config: auto needs the plan (gpu_memory_gib > 0)
        cfg.rollout.kv_cache_gb = plan.layout.kv_cache_gib
    say(describe_run(cfg, world_size, torch.cuda.get_device_name() if on_gpu else "CPU"))
    if plan is not None:
        say(memory_line(plan, world_size, on_gpu))
    check_host_memory(cfg, world_size, on_gpu=on_gpu)  # trainer.node_ram_gib
    init_parallel_state(cfg.parallel)
    lock = None
    try:
        # Rank 0's choice wins: a ${now:} in the path may resolve differently per rank.
        run_dir = broadcast_object(Path(cfg.trainer.output_dir).resolve(), src=0)
        cfg.trainer.output_dir = str(run_dir)
        lock = _claim(cfg, run_dir)
        say(f"run directory: {run_dir}")
        return Trainer(cfg, run_dir).run(stop)
    finally:
        if lock is not None:
            lock.release()
        destroy_parallel_state()


def _claim(cfg: ClipoConfig, run_dir: Path):
    """Rank 0 claims ``run_dir`` (:func:`clipo_nemo.trainer.run_directory.claim_run_directory`: its lock,
    writable checkpoints, an unchanged architecture, config.yaml, the file tools/evaluate.py --checkpoint
    rebuilds the policy from); its error, if any, is raised on every rank. Returns rank 0's lock."""
    from omegaconf import OmegaConf

    from clipo_nemo.trainer.run_directory import claim_run_directory

    lock, error = None, None
    if dist.get_rank() == 0:
        try:
            lock = claim_run_directory(cfg, run_dir, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            for note in lock.notes:
                say(f"warning: {note}")
        except Exception as err:  # noqa: BLE001 -- every rank raises it below
            error = err
    error = broadcast_object(error, src=0)
    if error is not None:
        raise error
    run_dir.mkdir(parents=True, exist_ok=True)
    return lock

