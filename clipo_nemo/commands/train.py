"""GRPO + CLIPO training on megatron-core.

    python examples/train_grpo_clipo.py --config-name=tiny                    # CPU, minutes
    python examples/train_grpo_clipo.py --config-name=track2 trainer.output_dir=/runs/t2
    torchrun --nproc_per_node=8 examples/train_grpo_clipo.py --config-name=track2 parallel.tensor_parallel_size=4

Installed as the ``clipo-train`` command (same arguments). Every key is documented in clipo_nemo/config.py; ``key=value`` overrides any of them. Running again
with the same ``trainer.output_dir`` resumes from its latest checkpoint.
"""
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from clipo_nemo.commands import config_dir
from clipo_nemo.config import ClipoConfig, check_known_keys

ConfigStore.instance().store(name="clipo_schema", node=ClipoConfig)


@hydra.main(config_path=str(config_dir()), config_name="tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    from clipo_nemo.trainer.loop import train

    check_known_keys(OmegaConf.to_container(cfg, resolve=False))  # '+key=value' gets past the schema
    config: ClipoConfig = OmegaConf.to_object(cfg)  # typed, validated against the schema
    result = train(config)
    if str(result["status"]).startswith("stopped:"):
        sys.exit(1)


if __name__ == "__main__":
    main()
