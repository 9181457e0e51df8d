"""Reading row/column ranges of one tensor of a safetensors file, touching only the pages they occupy.

A tensor-parallel rank needs ``1/TP`` of most tensors: a block of rows (column-parallel weights, the
vocabulary-parallel embedding and output layer, each half of SwiGLU's fused ``linear_fc1``) or a block
of columns (row-parallel weights). The file is memory-mapped with ``MADV_RANDOM`` and only the
requested ranges are copied out, so the kernel reads the pages those ranges occupy and nothing around
them (no read-ahead window). safetensors' own ``get_slice`` also maps the file, but with the kernel's
default read-ahead (``read_ahead_kb`` is 8192 on the CI VM) and through a mapping whose reads
``/proc/self/io`` did not account for (a 64 MB slice of a 128 MB tensor showed 8 MB read and 8 MB
resident), so what it reads could not be measured; the pages read here can.

The format (safetensors' documented layout): an 8-byte little-endian header length N, N bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
data, each tensor C-contiguous at ``8 + N + begin``.
"""
from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsFile:
    """One safetensors file: its tensors' shapes, and ranges of them read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        self.entries: Dict[str, dict] = header
        self.data_start = 8 + length

    def shape_of(self, name: str) -> Tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read_ranges(self, name: str, dim: int, ranges: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """The [start, stop) ranges of ``name`` along ``dim``, concatenated along ``dim`` (a new tensor)."""
        entry = self.entries[name]
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        parts: List[torch.Tensor] = []
        if end > begin:
            with open(self.path, "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            mapped.madvise(mmap.MADV_RANDOM)
            with warnings.catch_warnings():  # a read-only mapping: the view is only read, then copied
                warnings.filterwarnings("ignore", message="The given buffer is not writable")
                whole = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=self.data_start + begin)
            whole = whole.view(dtype).view(shape)
            parts = [whole.narrow(dim, start, stop - start).clone() for start, stop in ranges]
            del whole  # releases the mapping (closed once unreferenced)
        if not parts:
            empty_shape = list(shape)
            empty_shape[dim] = 0
            return torch.empty(empty_shape, dtype=dtype)
        return torch.cat(parts, dim=dim)
