"""clipo-nemo: CLIPO (contrastive learning in policy optimisation) on megatron-core."""
from setuptools import find_packages, setup

TRACKERS = ["wandb>=0.19", "mlflow-skinny>=2.16"]
DATASETS = ["datasets>=3.0"]

# Name, version, Python and the console commands are in pyproject.toml (PEP 621).
setup(
    # The YAML configs travel in the package as clipo_nemo/conf (clipo_nemo.commands.config_dir).
    packages=find_packages(include=["clipo_nemo", "clipo_nemo.*"]) + ["clipo_nemo.conf"],
    package_dir={"clipo_nemo.conf": "examples/conf"},
    package_data={"clipo_nemo.conf": ["*.yaml"]},
    install_requires=[
        # CPU machines pin torch==2.13.0 before installing this package (see Makefile);
        # NGC containers bring their own CUDA build.
        "torch>=2.4",
        # 0.16.x is the newest release that installs on Python 3.11; NGC carries newer.
        "megatron-core>=0.16",
        # dist_checkpointing imports psutil without declaring it.
        "psutil",
        "omegaconf>=2.3",
        "hydra-core>=1.3",
        # hydra pins antlr4 4.9.*, so math-verify's LaTeX parser must use the same runtime.
        "math-verify[antlr4_9_3]>=0.9",
        "pandas",
        "pyarrow",
        "tensorboard",
        "tqdm",
        "matplotlib",
        "transformers>=4.45",
        "tokenizers",
    ],
    extras_require={
        # trainer.loggers=[wandb, mlflow]: the W&B client and MLflow's client (mlflow-skinny; a server or
        # a sqlite store needs the full mlflow package).
        "trackers": TRACKERS,
        # Hugging Face datasets as data (save_to_disk directories, hub names from the local cache).
        "datasets": DATASETS,
        # The tests log to W&B (offline) and MLflow (file store) and build small datasets; scipy: the
        # ablation's statistics (benchmarks/ablation.py) and their tests.
        "test": ["pytest", "pytest-timeout", "hypothesis", "scipy", *TRACKERS, *DATASETS],
        # Provided by NGC NeMo / TensorRT-LLM containers; not installable on CPU machines.
        "gpu": ["tensorrt-llm", "transformer-engine"],
    },
)
