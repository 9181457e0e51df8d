"""Stand-in for ``tensorrt_llm/_utils.py``: the MPI initialisation at import, and the call record.

The real module runs ``from mpi4py import MPI`` and ``comm = MPI.COMM_WORLD`` at import (mpi4py calls
``MPI_Init`` then); in a process started by ``srun ... torchrun`` the inherited PMI/PMIx identity of
the node task makes that fail or join the wrong world (verl, ``docs/workers/trtllm_worker.rst``,
unsets ``PMI*/PMIX*/OMPI*`` first). Newer snapshots skip the import when ``mpi_disabled()``
(``TLLM_DISABLE_MPI=1``, which ``executor/ray_executor.py`` also sets for its Ray workers). The
stand-in records every import (``{"call": "import", "rank": RANK, "mpi": bool}``) and raises the way
MPI_Init fails when it would initialise MPI with PMI/PMIx/Open MPI variables present.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

CALLS: List[Dict[str, Any]] = []
FAIL: Dict[str, Optional[int]] = {"generate": None}
LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "OMPI_")


def record(entry: Dict[str, Any]) -> None:
    CALLS.append(entry)
    path = os.environ.get("TRTLLM_STUB_LOG")
    if path:
        with open(path, "a") as log:
            log.write(json.dumps(entry) + "\n")


def mpi_disabled() -> bool:
    """As the real ``mpi_disabled()``: ``TLLM_DISABLE_MPI`` set to 1."""
    return os.environ.get("TLLM_DISABLE_MPI", "0") == "1"


MPI_INITIALIZED = not mpi_disabled()
record({"call": "import", "rank": os.environ.get("RANK"), "mpi": MPI_INITIALIZED})
if MPI_INITIALIZED:
    _inherited = sorted(k for k in os.environ if k.startswith(LAUNCHER_PREFIXES))
    if _inherited:
        raise RuntimeError(f"stand-in MPI_Init: the process carries the launcher's MPI identity {_inherited[:4]} "
                           "(importing tensorrt_llm initialises MPI unless TLLM_DISABLE_MPI=1)")
