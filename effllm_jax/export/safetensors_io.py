"""Streaming safetensors: write one tensor at a time, read lazily (single file or sharded).

`safetensors.numpy.save_file` needs every tensor in memory at once; exporting a model that
way doubles host memory. The format is simple (8-byte header length, JSON header with
offsets, raw little-endian data), so the writer plans the header from shapes alone and then
builds, writes and frees each tensor in turn. Reading goes through `safetensors.safe_open`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open

_DTYPE_NAMES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
    np.dtype(np.bool_): "BOOL",
}


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """A tensor to write: its name, shape and dtype up front, its values built on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]


def write_safetensors(path: str, plans: Sequence[TensorPlan],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes `plans` to `path` holding at most one built tensor in memory at a time."""
    header: dict = {}
    offset = 0
    for plan in plans:
        dtype = np.dtype(plan.dtype)
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {plan.name}: dtype {dtype} cannot be stored in safetensors")
        if plan.name in header:
            raise ValueError(f"tensor {plan.name} planned twice")
        nbytes = int(np.prod(plan.shape, dtype=np.int64)) * dtype.itemsize
        header[plan.name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(plan.shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for plan in plans:
            array = np.ascontiguousarray(plan.make(), dtype=plan.dtype)
            if tuple(array.shape) != tuple(plan.shape):
                raise ValueError(f"tensor {plan.name}: built with shape {tuple(array.shape)}, "
                                 f"planned {tuple(plan.shape)}")
            f.write(array.view(np.uint8).reshape(-1).data)
            del array
    os.replace(tmp, path)  # never leave a half-written file under the final name


class TensorSource(contextlib.AbstractContextManager):
    """Lazy read access to the tensors of one safetensors file or a sharded index."""

    def __init__(self, path: str):
        self._stack = contextlib.ExitStack()
        self._where: dict[str, object] = {}
        if path.endswith(".json"):  # model.safetensors.index.json
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            base = os.path.dirname(path)
            paths = [os.path.join(base, name) for name in files]
        else:
            paths = [path]
        for p in paths:
            if not os.path.exists(p):
                raise FileNotFoundError(f"safetensors file {p} is missing")
            check_complete(p)
            handle = self._stack.enter_context(safe_open(p, framework="numpy"))
            for name in handle.keys():
                self._where[name] = handle
        self.path = path

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        """All tensor names."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor without reading it."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str, shape: Iterable[int] | None = None) -> np.ndarray:
        """Reads one tensor, checking its shape when `shape` is given."""
        handle = self._handle(name)
        if shape is not None:
            shape, found = tuple(shape), self.shape(name)
            if found != shape:
                raise ValueError(f"tensor {name} in {self.path} has shape {found}; "
                                 f"expected {shape}")
        return handle.get_tensor(name)

    def _handle(self, name: str):
        if name not in self._where:
            raise KeyError(f"tensor {name} is missing from {self.path}")
        return self._where[name]


def check_complete(path: str) -> None:
    """Raises ValueError naming `path` as truncated when it is shorter than its header says."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"safetensors file {path} is truncated ({size} bytes, no header)")
        header_len = int.from_bytes(prefix, "little")
        if 8 + header_len > size:
            raise ValueError(f"safetensors file {path} is truncated: {size} bytes, shorter "
                             f"than its {header_len}-byte header")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise ValueError(f"safetensors file {path} has an unreadable header: {e}") from None
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    need = 8 + header_len + max(ends, default=0)
    if need > size:
        raise ValueError(f"safetensors file {path} is truncated: {size} bytes of the {need} "
                         f"its header describes")


def find_weights(directory: str) -> str:
    """The safetensors file (or sharded index) of a model directory."""
    for name in ("model.safetensors", "model.safetensors.index.json"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")
