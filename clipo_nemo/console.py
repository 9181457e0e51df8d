"""What clipo-nemo prints, set up once at start-up by the trainer and by the tools.

Library messages that do not concern a user are filtered here, in one place, each by its category (a
warning class and the module that issues it, or a logger) and its message: never a blanket filter, so
a warning not listed below still shows. ``trainer.log_level=debug`` (the tools: ``--log-level debug``)
shows them all again.

Python warnings are routed through :mod:`logging` (``logging.captureWarnings``), so every line a
library prints goes through the root logger's handlers: those the training loop writes while its
progress bar runs land above the bar (``tqdm.contrib.logging.logging_redirect_tqdm``), and on a
``torchrun`` rank other than 0 they carry a ``[rank N]`` prefix (those ranks show warnings and errors
only). Our own lines are printed by global rank 0 alone (:func:`say`).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import List

from clipo_nemo.config import LOG_LEVELS

# (category, issuing module pattern, message pattern, why it is noise). The patterns match at the start,
# as ``warnings.filterwarnings`` matches them.
LIBRARY_WARNINGS = (
    (UserWarning, r"megatron", r"(Transformer Engine and )?Apex (is|are) not installed",
     "megatron-core falls back to its torch implementations without Transformer Engine/Apex: the CPU path "
     "(and a GPU image without them) uses those on purpose"),
    (FutureWarning, r"megatron\.core\.dist_checkpointing\.", r"`load_state_dict` is deprecated",
     "megatron-core's dist_checkpointing calls torch's older distributed-checkpoint entry point"),
    (FutureWarning, r"(torch\.distributed\.checkpoint\.|clipo_nemo\.parallel\.cpu)",
     r"Please use DTensor instead and we are deprecating ShardedTensor",
     "torch's distributed checkpoint reading megatron-core's ShardedTensor checkpoints (on a CPU, the fully "
     "parallel load runs under parallel/cpu.py's device mode, which the warning is then attributed to)"),
    (FutureWarning, r"torch\.distributed\.", r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
     "megatron-core's tensor-parallel gathers call it (clipo-nemo does not)"),
    (UserWarning, r"", r"TypedStorage is deprecated",
     "megatron-core's offload_grad_buffers reads tensor.storage() (actor.release_for_rollout calls it); the "
     "warning is attributed to no module name, so it is matched by its message alone"),
)
# Filtered on machines without CUDA only: advice for GPU runs.
CPU_ONLY_WARNINGS = (
    (UserWarning, r"megatron", r"When using (async grad allreduce|sequence parallelism) it is recommended to set "
     r"the environment variable CUDA_DEVICE_MAX_CONNECTIONS", "a CUDA stream setting, meaningless on a CPU"),
)

# (logger name prefix, message pattern, why it is noise)
LIBRARY_LOG_LINES = (
    ("megatron", r"Using Megatron-FSDP without Transformer Engine", "an import-time notice; FSDP is not used"),
    ("megatron", r"Detected Megatron Core, using Megatron-FSDP with Megatron", "an import-time notice, twice"),
    ("megatron", r"Setting up DistributedDataParallel with config", "the whole DistributedDataParallelConfig repr"),
    ("megatron", r"Number of buckets for gradient all-reduce", "every parameter of every gradient bucket"),
)


def global_rank() -> int:
    """This process's global rank: torch.distributed's once initialised, else the launcher's ``RANK``
    (torchrun, ``python -m clipo_nemo.parallel.launcher``, the SLURM scripts), else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def say(text: str) -> None:
    """One of our own lines: printed (and flushed) by global rank 0 only."""
    if global_rank() == 0:
        print(text, flush=True)


class LibraryNoiseFilter(logging.Filter):
    """Drops the log records :data:`LIBRARY_LOG_LINES` lists (the warnings of :data:`LIBRARY_WARNINGS`
    are dropped by ``warnings`` itself, before they become records)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(record.name.startswith(prefix) and re.match(pattern, text)
                       for prefix, pattern, _ in LIBRARY_LOG_LINES)


class WarningText(logging.Filter):
    """A captured warning's text without the newline ``warnings.formatwarning`` ends it with."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            record.msg, record.args = record.getMessage().rstrip("\n"), None
        return True


class RankPrefix(logging.Filter):
    """Prefixes ``[rank N]`` to every record a rank other than 0 shows."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "rank_prefixed", False):
            record.msg, record.args = f"[rank {self.rank}] {record.getMessage()}", None
            record.rank_prefixed = True
        return True


# The handler filters the last setup_console installed, so that a second call replaces them (its warning
# filters stay: a process applies one log level, before the libraries are imported).
_installed: List[tuple] = []


def setup_console(log_level: str = "info") -> None:
    """Apply ``log_level`` (one of :data:`clipo_nemo.config.LOG_LEVELS`) to this process: before the
    libraries are imported, so that their import-time warnings are filtered too.

    ``info``: the listed library messages are dropped; rank 0 shows INFO and above, other ranks
    WARNING and above. ``debug``: nothing is dropped and every rank shows DEBUG and above. Either way
    warnings go through logging, and other ranks' lines carry ``[rank N]``. The trainer's Hydra
    configuration gives the root logger a stdout handler; a tool without one gets a stderr handler.
    """
    if log_level not in LOG_LEVELS:
        raise ValueError(f"log level {log_level!r} is not one of {list(LOG_LEVELS)} (trainer.log_level, or a "
                         "tool's --log-level)")
    for handler, log_filter in _installed:
        handler.removeFilter(log_filter)
    _installed.clear()
    root, rank = logging.getLogger(), global_rank()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    quiet = log_level == "info"
    root.setLevel(logging.DEBUG if not quiet else logging.INFO if rank == 0 else logging.WARNING)
    logging.captureWarnings(True)
    if quiet:
        import torch

        for category, module, message, _ in LIBRARY_WARNINGS + (() if torch.cuda.is_available() else CPU_ONLY_WARNINGS):
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for handler in root.handlers:
        chosen = [WarningText()] + ([LibraryNoiseFilter()] if quiet else []) + ([RankPrefix(rank)] if rank else [])
        for log_filter in chosen:
            handler.addFilter(log_filter)
            _installed.append((handler, log_filter))


def add_log_level_argument(parser) -> None:
    """The tools' verbosity switch (an ``argparse`` parser): ``--log-level info|debug``."""
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                        help="info: library messages that do not concern you are filtered (clipo_nemo/console.py); "
                             "debug: everything is shown")

