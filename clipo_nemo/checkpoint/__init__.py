"""Checkpoints: save, resume and recover a run's policy, reference pointer, head, both optimizers,
trainer state and RNG states.

Every rank of the job calls :func:`~clipo_nemo.checkpoint.save.save_checkpoint` /
:func:`~clipo_nemo.checkpoint.load.load_checkpoint` together (after ``init_parallel_state``);
``run_dir`` must be visible to all ranks (one machine, or a shared file system, as megatron's
``dist_checkpointing`` itself assumes). The package imports nothing of the trainer: it works on the
two interfaces of :mod:`~clipo_nemo.checkpoint.contents`.

On-disk format (``meta.json``'s ``format``: 3; formats 1 (the reference stored inline) and 2 (before the
megatron optimizer's format was named) still load)::

    run_dir/checkpoints/
        latest                  text: the name of the newest complete checkpoint ("step_12")
        step_<N>/               one complete checkpoint (renamed from .tmp-step_<N> when whole)
            dist/               megatron-core dist_checkpointing (torch_dist): weights and optimizer
                                moments as global sharded tensors, so they load at any TP/PP/DP
            rng/rank_<r>.pt     rank r's RNG states (python, numpy, torch, CUDA, megatron tracker)
            trainer_state.pt    the loop's own dict (rank 0's copy)
            manifest.json       size, CRC-32 and writing rank of every file above (each rank checksums its own)
            meta.json           step, layout, contents and the reference pointer; written last
        step_<N>.skipped/       a checkpoint skipped at resume, set aside before step N is saved again
        reference/              a random-init run's frozen reference policy, written once (dist/, meta.json)
        .tmp-step_<N>/          a save in progress or killed mid-way: never read, removed by the next save

Sharded keys (global shapes, independent of the layout): ``policy.*`` and ``reference.*`` are the
GPTModels' own ``sharded_state_dict``; ``head.proj.weight`` (or ``head.proj.0.weight`` /
``head.proj.2.weight`` for the MLP head) are the whole [out, in] head weights, so the head's
``replicated`` and ``column`` modes load each other's checkpoints; optimizer moments are
``optimizer.state.<moment>.<parameter key>`` (megatron's own naming) and each optimizer's shared step
and hyperparameters one ``ShardedObject``. On GPU the policy optimizer is megatron's and contributes
its own ``sharded_state_dict`` in the format ``meta.json`` names (``policy_optimizer.sharding``; see
:func:`~clipo_nemo.checkpoint.sharded_state.megatron_optimizer_metadata`): ``dp_reshardable`` by default
(each rank writes and reads only its own shard; loads at another DP size, and a resume at another TP/PP
is refused with the way to change layout: resume once at the saved TP/PP with
``trainer.reshardable_optimizer_checkpoints=true`` and save), or ``fully_reshardable`` (any layout);
format-2 checkpoints are ``fully_reshardable``. That path is written against megatron's API but is not
exercised on this CPU-only machine.
Transformer Engine layers' ``_extra_state`` entries that a checkpoint lacks (one written with
megatron's local layers) are not requested and stay as built. RNG states are restored only at the
layout they were saved at (they are per rank); at another layout a warning says so and the current
RNG streams are kept.

The reference policy is not in the step checkpoints: ``meta.json`` points to it with a checksum
(the converted ``init_from`` checkpoint, another run's reference, or ``reference/``; see
:mod:`~clipo_nemo.checkpoint.reference`).

Save (:mod:`~clipo_nemo.checkpoint.save`):
  1. wait for a pending asynchronous save; rank 0 removes leftover ``.tmp-*`` directories;
  2. the first save of a random-init run with a reference writes ``reference/`` once;
  3. every rank writes its RNG states, rank 0 the trainer state, and every data-parallel rank its
     share of the sharded tensors (:mod:`~clipo_nemo.checkpoint.writer`; in the background with
     ``trainer.async_save``); each rank's writer process then checksums the shard files it wrote;
  4. once every rank's files are complete, every rank checksums its RNG file (rank 0 also the trainer
     state) and sends its records to rank 0, which merges them with the writers' records into
     ``manifest.json`` (reading only the few small files written at finalize), then writes ``meta.json``
     (both fsynced), renames ``.tmp-step_<N>`` to ``step_<N>``, replaces ``latest`` atomically and
     prunes all but the newest ``trainer.keep_last`` checkpoints.
  A SIGKILL at any point leaves ``latest`` naming a complete checkpoint (the rename and the pointer
  update are atomic ``os.replace`` calls). Shard files are not fsynced, so a power loss right after
  a save may still need the previous checkpoint: resume verifies.

Resume (:mod:`~clipo_nemo.checkpoint.load`, :mod:`~clipo_nemo.checkpoint.recovery`):
  1. the checkpoint ``latest`` names is verified against its manifest (sizes and CRC-32s), the work
     split over the ranks (:mod:`~clipo_nemo.checkpoint.shared_verify`: at an unchanged world size each
     rank checks the files it wrote, otherwise a size-balanced share) and the verdicts all-gathered,
     so every rank takes the same decision;
  2. if it, or ``latest`` itself, is damaged, the newest ``step_N`` that verifies is used (fallback),
     each skipped checkpoint named in a warning, and no old checkpoint is pruned until the run has
     saved past them; a run directory whose checkpoints all fail is an error, never a fresh start;
  3. the reference is checked against its pointer (file sizes and modification times; its SHA-256
     only when those differ) and loaded; weights and optimizer states load at any TP/PP/DP layout
     (but see ``dp_reshardable`` above) and either head TP mode, through megatron's fully parallel
     load over the data-parallel group (:mod:`~clipo_nemo.checkpoint.reader`: each rank reads a share
     of the replicated tensors and broadcasts it to the others);
  4. :mod:`~clipo_nemo.checkpoint.load_guard` proves the optimizer's copies of the weights are the
     model's (refreshing megatron's fp32 main copies where they are not).
"""
