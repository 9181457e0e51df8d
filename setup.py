"""clipo-nemo: CLIPO (contrastive learning in policy optimisation) on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="clipo-nemo",
    version="0.1.0",
    description="GRPO-style RLVR with a contrastive (InfoNCE) reward, on megatron-core",
    packages=find_packages(include=["clipo_nemo", "clipo_nemo.*"]),
    python_requires=">=3.10",
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
        # scipy: the ablation's statistics (benchmarks/ablation.py) and their tests.
        "test": ["pytest", "pytest-timeout", "hypothesis", "scipy"],
        # Provided by NGC NeMo / TensorRT-LLM containers; not installable on CPU machines.
        "gpu": ["tensorrt-llm", "transformer-engine"],
    },
)
