#!/usr/bin/env python
"""GRPO + CLIPO training on megatron-core (a thin wrapper of ``clipo_nemo.commands.train``, installed as
the ``clipo-train`` command; see there).

    python examples/train_grpo_clipo.py --config-name=tiny                    # CPU, minutes
    python examples/train_grpo_clipo.py --config-name=track2 trainer.output_dir=/runs/t2
    torchrun --nproc_per_node=8 examples/train_grpo_clipo.py --config-name=track2 parallel.tensor_parallel_size=4
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipo_nemo.commands.train import main  # noqa: E402

if __name__ == "__main__":
    main()
