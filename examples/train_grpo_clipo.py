#!/usr/bin/env python
"""GRPO + CLIPO training on megatron-core.

    python examples/train_grpo_clipo.py --config-name=tiny                    # CPU, minutes
    python examples/train_grpo_clipo.py --config-name=track2 trainer.output_dir=/runs/t2
    torchrun --nproc_per_node=8 examples/train_grpo_clipo.py --config-name=track2 parallel.tensor_parallel_size=4

Every key, with its type, default and meaning, is listed in docs/config.md (generated from the schema,
clipo_nemo/config.py); ``key=value`` overrides any of them, ``--cfg job`` prints the resolved config
without running it. Running again with the same ``trainer.output_dir`` resumes from its latest
checkpoint. ``trainer.log_level=debug`` shows the library messages filtered at start-up.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from clipo_nemo.config import ClipoConfig, check_known_keys, register_resolvers  # noqa: E402
from clipo_nemo.console import say, setup_console  # noqa: E402

ConfigStore.instance().store(name="clipo_schema", node=ClipoConfig)
register_resolvers()  # ${run_stamp:} in the default trainer.output_dir


@hydra.main(config_path="conf", config_name="tiny", version_base=None)
def main(cfg: DictConfig) -> None:
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


if __name__ == "__main__":
    if {"--help", "-h"} & set(sys.argv[1:]):
        configs = sorted(p.stem for p in (Path(__file__).parent / "conf").glob("*.yaml"))
        print(f"{__doc__.strip()}\n\n--config-name: {', '.join(configs)} (examples/conf/); Hydra's own help: --hydra-help")
        sys.exit(0)
    main()
