#!/usr/bin/env python
"""GRPO + CLIPO training on megatron-core.

    python examples/train_grpo_clipo.py --config-name=tiny                    # CPU, minutes
    python examples/train_grpo_clipo.py --config-name=track2 trainer.output_dir=/runs/t2
    torchrun --nproc_per_node=8 examples/train_grpo_clipo.py --config-name=track2 parallel.tensor_parallel_size=4

Every key is documented in clipo_nemo/config.py; ``key=value`` overrides any of them. Running again
with the same ``trainer.output_dir`` resumes from its latest checkpoint.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from clipo_nemo.config import ClipoConfig, check_known_keys, register_resolvers  # noqa: E402

ConfigStore.instance().store(name="clipo_schema", node=ClipoConfig)
register_resolvers()  # ${run_stamp:} in the default trainer.output_dir


@hydra.main(config_path="conf", config_name="tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    from clipo_nemo.trainer.loop import train

    check_known_keys(OmegaConf.to_container(cfg, resolve=False))  # '+key=value' gets past the schema
    config: ClipoConfig = OmegaConf.to_object(cfg)  # typed, validated against the schema
    result = train(config)
    if str(result["status"]).startswith("stopped:"):
        sys.exit(1)


if __name__ == "__main__":
    main()
