"""GRPO + CLIPO training on megatron-core.

    python examples/train_grpo_clipo.py --config-name=tiny                    # CPU, minutes
    python examples/train_grpo_clipo.py --config-name=track2 trainer.output_dir=/runs/t2
    torchrun --nproc_per_node=8 examples/train_grpo_clipo.py --config-name=track2 parallel.tensor_parallel_size=4

Installed as the ``clipo-train`` command (same arguments). Every key, with its type, default and
meaning, is listed in docs/config.md (generated from the schema, clipo_nemo/config.py); ``key=value``
overrides any of them, ``--cfg job`` prints the resolved config without running it. Running again
with the same ``trainer.output_dir`` resumes from its latest checkpoint. ``trainer.log_level=debug``
shows the library messages filtered at start-up.
"""
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from clipo_nemo.commands import config_dir
from clipo_nemo.config import ClipoConfig, check_known_keys, register_resolvers
from clipo_nemo.console import say, setup_console

ConfigStore.instance().store(name="clipo_schema", node=ClipoConfig)
register_resolvers()  # ${run_stamp:} in the default trainer.output_dir


@hydra.main(config_path=str(config_dir()), config_name="tiny", version_base=None)
def train_from_hydra(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    check_known_keys(OmegaConf.to_container(cfg, resolve=False))  # '+key=value' gets past the schema
    config: ClipoConfig = OmegaConf.to_object(cfg)  # typed, validated against the schema
    setup_console(config.trainer.log_level)  # before megatron-core is imported: its import-time warnings
    from clipo_nemo.trainer.loop import train

    job = HydraConfig.get()
    overrides = " ".join(job.overrides.task)
    say(f"clipo-nemo: examples/conf/{job.job.config_name}.yaml{' with ' + overrides if overrides else ''}")
    result = train(config)
    if str(result["status"]).startswith("stopped:"):
        sys.exit(1)


def main() -> None:
    """``--help``: this text and the configs; otherwise Hydra's command line (``--hydra-help``)."""
    if {"--help", "-h"} & set(sys.argv[1:]):
        configs = sorted(p.stem for p in config_dir().glob("*.yaml"))
        print(f"{__doc__.strip()}\n\n--config-name: {', '.join(configs)} (examples/conf/); Hydra's own help: --hydra-help")
        sys.exit(0)
    train_from_hydra()


if __name__ == "__main__":
    main()
