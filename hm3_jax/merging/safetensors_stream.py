"""Lazy reading of Hugging Face safetensors checkpoints and a shard writer that writes tensor by tensor.

`safetensors.numpy.save_file` needs every tensor of a shard in memory at once; `ShardWriter` instead writes
the header first (the output names, dtypes and shapes are known before any tensor is merged) and then
appends each tensor's bytes as soon as it exists, so a merge holds only a few tensors at a time. The files
it writes are ordinary safetensors files (checked in the tests by `safetensors.safe_open`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from hm3_jax.io import safetensors_io
from hm3_jax.io.safetensors_io import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    open_safetensors,
    shard_file_names,
)

_DTYPE_CODES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_NAMED_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
}


def dtype_from_name(name: str) -> np.dtype:
    """`"bfloat16"` / `"float16"` / `"float32"` / `"float64"` -> numpy dtype (ml_dtypes for bfloat16)."""
    if name not in _NAMED_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; supported: {sorted(_NAMED_DTYPES)}")
    return _NAMED_DTYPES[name]


def is_float(dtype: np.dtype) -> bool:
    """Whether `dtype` is a floating dtype (numpy's or ml_dtypes' bfloat16): the tensors a merge changes."""
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype).name == "bfloat16"


def output_dtype(src_dtype: np.dtype, out_dtype: np.dtype | None) -> np.dtype:
    """The dtype a merge writes a tensor of `src_dtype` in: `out_dtype` for floating tensors when one is given,
    else `src_dtype` (integer buffers are never converted)."""
    return out_dtype if (out_dtype is not None and is_float(src_dtype)) else src_dtype


def dtype_code(dtype: Any) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"dtype {dtype} cannot be written to safetensors")
    return _DTYPE_CODES[dtype]


class Checkpoint:
    """A Hugging Face checkpoint directory (one `model.safetensors` or shards with an index), read lazily.

    `names` are sorted; `shape(name)`, `dtype(name)` come from the headers; `get(name)` reads one tensor.
    `get` reads a tensor's bytes with one positioned read into a fresh array (no memory map), so a streaming
    merge's resident memory is its current tensors, not the mapped pages of every checkpoint it has read.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            what = "is not a directory" if os.path.exists(self.path) else "does not exist"
            raise FileNotFoundError(f"checkpoint directory {self.path!r} {what}")
        index = os.path.join(self.path, SAFE_WEIGHTS_INDEX_NAME)
        single = os.path.join(self.path, SAFE_WEIGHTS_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files = [SAFE_WEIGHTS_NAME]
            weight_map = None
        else:
            raise FileNotFoundError(
                f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in checkpoint directory {self.path!r}"
            )
        self._handles = {}
        self._file_of: dict[str, str] = {}
        self._span: dict[str, tuple[int, int]] = {}
        self._meta: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for file in files:
            full = os.path.join(self.path, file)
            open_safetensors(full)  # validates the file (CheckpointError naming it)
            self._handles[file] = open(full, "rb")  # noqa: SIM115 (closed by close())
            with open(full, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _CODE_DTYPES:
                    raise ValueError(f"{full}: tensor {name!r} has unsupported dtype {info['dtype']}")
                self._file_of[name] = file
                self._meta[name] = (tuple(info["shape"]), _CODE_DTYPES[info["dtype"]])
                start, stop = info["data_offsets"]
                self._span[name] = (8 + header_len + start, stop - start)
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._file_of))
            if missing:
                raise ValueError(f"{index} lists tensor {missing[0]!r} that no shard contains")
        self.names = sorted(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> np.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> np.ndarray:
        shape, dtype = self._meta[name]
        offset, nbytes = self._span[name]
        out = np.empty(shape, dtype)
        if nbytes != out.nbytes:
            raise ValueError(f"{self.path}: tensor {name!r} has {nbytes} bytes for shape {shape} {dtype}")
        view = memoryview(out.reshape(-1).view(np.uint8))
        handle = self._handles[self._file_of[name]]
        done = 0
        while done < nbytes:
            got = os.preadv(handle.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"{self.path}: file ends inside tensor {name!r}")
            done += got
        return out

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardWriter:
    """Writes one safetensors file whose tensors (names, dtypes, shapes, in order) are declared up front.

    Usage: `w = ShardWriter(path, [(name, dtype, shape), ...]); w.write(name, array) ...; w.close()`.
    Tensors must be written in the declared order with the declared dtype and shape.
    """

    def __init__(self, path: str, entries: Sequence[tuple[str, Any, tuple[int, ...]]], metadata=None):
        self.path = path
        self._entries = [(name, np.dtype(dtype), tuple(shape)) for name, dtype, shape in entries]
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in self._entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {
                "dtype": dtype_code(dtype),
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        self.nbytes = offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
        self._file = open(path, "wb")
        self._file.write(len(blob).to_bytes(8, "little"))
        self._file.write(blob)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        expected_name, dtype, shape = self._entries[self._next]
        if name != expected_name or array.dtype != dtype or tuple(array.shape) != shape:
            raise ValueError(
                f"{self.path}: expected tensor {expected_name!r} {dtype} {shape}, got {name!r} {array.dtype} "
                f"{tuple(array.shape)}"
            )
        self._file.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._entries):
            self._file.close()
            raise ValueError(f"{self.path}: only {self._next} of {len(self._entries)} tensors were written")
        self._file.close()


def plan_shards(
    entries: Sequence[tuple[str, Any, tuple[int, ...]]], max_shard_bytes: int
) -> list[list[tuple[str, Any, tuple[int, ...]]]]:
    """Splits `(name, dtype, shape)` entries, in order, into shards of at most `max_shard_bytes` (a tensor
    larger than that gets a shard of its own; `safetensors_io.plan_shards` on the entries' sizes)."""
    sizes = (
        (i, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        for i, (_, dtype, shape) in enumerate(entries)
    )
    return [[entries[i] for i in shard] for shard in safetensors_io.plan_shards(sizes, max_shard_bytes)]


def write_index(
    directory: str, shards: Sequence[Sequence[tuple]], files: Sequence[str], total_bytes: int
) -> None:
    """`model.safetensors.index.json` for a sharded checkpoint (nothing for a single file)."""
    if len(files) == 1:
        return
    weight_map = {entry[0]: file for shard, file in zip(shards, files, strict=True) for entry in shard}
    with open(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)


def write_shards(
    directory: str,
    entries: Sequence[tuple[str, Any, tuple[int, ...]]],
    max_shard_bytes: int,
    tensor_fn: Callable[[str, np.dtype], np.ndarray],
    tensor_done: Callable[[], Any] = lambda: None,
) -> int:
    """Writes the tensors `entries` (`(name, dtype, shape)`, in order) into shards of at most `max_shard_bytes`
    in `directory`, plus the index when there are several (`write_index`), one tensor at a time.

    `tensor_fn(name, dtype)` gives each tensor's array when its turn comes (so at most a few tensors are in
    memory); `tensor_done()` is called after each is written (a progress bar's update). Returns the bytes
    written."""
    shards = plan_shards(entries, max_shard_bytes)
    files = shard_file_names(len(shards))
    total = 0
    for shard, file in zip(shards, files, strict=True):
        writer = ShardWriter(os.path.join(directory, file), shard)
        for name, dtype, _ in shard:
            array = tensor_fn(name, dtype)
            writer.write(name, array)
            total += array.nbytes
            tensor_done()
        writer.close()
    write_index(directory, shards, files, total)
    return total
