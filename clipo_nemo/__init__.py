"""clipo-nemo: GRPO + CLIPO on megatron-core.

Importing the package checks the installed megatron-core (its metadata only; megatron itself is
imported where it is used). The code is written against megatron-core 0.16's API (for instance the
checkpoint code passes the distributed optimizer's ``distrib_optim_sharding_type`` metadata, and
the tests ran on 0.16.1); an older one, such as the 0.14 that NGC NeMo 25.09 carries, would fail
deep inside a run (at the first save) instead of here.
"""
from __future__ import annotations

from typing import Optional, Tuple

MIN_MEGATRON_CORE: Tuple[int, int] = (0, 16)


def megatron_core_version() -> Optional[str]:
    """The installed megatron-core's version string, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return None


def check_megatron_core(version: Optional[str]) -> None:
    """Raise ImportError unless ``version`` (a megatron-core version string) is at least
    :data:`MIN_MEGATRON_CORE`. Pre-releases and local builds of that release (``0.16.0rc0``,
    ``0.16.0+nv``) count as that release: NGC containers carry such builds."""
    from packaging.version import InvalidVersion, Version

    wanted = ".".join(map(str, MIN_MEGATRON_CORE))
    fix = (f"install megatron-core>={wanted} (pip install --no-deps megatron-core==0.16.1 keeps a container's "
           "CUDA torch) or build the Dockerfile")
    if version is None:
        raise ImportError(f"clipo-nemo needs megatron-core >= {wanted}, which is not installed: {fix}")
    try:
        release = Version(version).release
    except InvalidVersion:
        raise ImportError(f"clipo-nemo needs megatron-core >= {wanted}; cannot read the installed version "
                          f"{version!r}: {fix}") from None
    if release[:2] < MIN_MEGATRON_CORE:
        raise ImportError(f"clipo-nemo needs megatron-core >= {wanted}, found {version} (this code is written "
                          f"against megatron-core {wanted}'s API): {fix}")


check_megatron_core(megatron_core_version())
