"""Safetensors files of a Hugging Face checkpoint: locate, read tensor by tensor, write sharded.

Layouts read: a single `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` listed in
`model.safetensors.index.json` (`{"metadata": {"total_size": bytes}, "weight_map": {name: file}}`).
A directory with only PyTorch pickles (`pytorch_model.bin`, `*.bin` shards) is refused with instructions to
convert it: pickles can run arbitrary code, so they are never opened.

Reading goes through `safetensors.safe_open(framework="numpy")`: one tensor is materialised at a time, and
shapes/dtypes can be inspected without reading data. bfloat16 tensors come back as `ml_dtypes.bfloat16`.

Writing plans the shards from tensor sizes first (so the `-of-0000n` names are known), writes every file
into a directory; `hm3_jax.io.atomic.atomic_directory` makes that a temporary sibling renamed into place, so a
failed or interrupted save never leaves a half-written checkpoint under the target name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")

CONVERT_SNIPPET = """\
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained("{path}", torch_dtype="auto")  # needs torch
    model.save_pretrained("{path}-safetensors", safe_serialization=True)"""

_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


class CheckpointError(ValueError):
    """A checkpoint directory is missing files, or its files are inconsistent."""


def open_safetensors(path: str):
    """`safe_open(path, framework="numpy")`; a file safetensors cannot read (truncated, or not safetensors at all,
    e.g. a renamed pickle: never unpickled) is a CheckpointError naming it."""
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # safetensors raises SafetensorError, OSError, ... for unreadable files
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like `"2GB"`, `"500MB"`, `"10KiB"` (as HF: GB = 10**9)."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be an int or a string like '2GB', got {size!r}")
    if isinstance(size, int | np.integer):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return int(size)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    unit = match.group(2).upper() if match else ""
    if match is None or (unit and unit not in _SIZE_UNITS):
        raise ValueError(f"max_shard_size={size!r} is not a size like 2GB, 500MB or 1000000")
    value = int(float(match.group(1)) * _SIZE_UNITS.get(unit or "B"))
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def find_weight_files(path: str | os.PathLike) -> dict[str, str]:
    """Maps every tensor name of the checkpoint in `path` to the safetensors file that holds it.

    Raises:
      CheckpointError: no safetensors weights (with conversion instructions when only PyTorch/TF/Flax
        pickles or msgpack files exist), an index naming missing shard files, or a tensor listed in the index
        that its shard does not contain.
    """
    path = os.fspath(path)
    single = os.path.join(path, SAFE_WEIGHTS_NAME)
    index = os.path.join(path, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(
                    f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}"
                ) from e
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(path, name))]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist in {path!r}: {missing}")
        names: dict[str, str] = {}
        for name in files:
            full = os.path.join(path, name)
            with open_safetensors(full) as f:
                for key in f.keys():
                    names[key] = full
        absent = [k for k, v in weight_map.items() if names.get(k) != os.path.join(path, v)]
        if absent:
            raise CheckpointError(f"{index}: tensors not found in the shard the index names: {absent[:10]}")
        return {k: names[k] for k in weight_map}
    if os.path.isfile(single):
        with open_safetensors(single) as f:
            return {key: single for key in f.keys()}
    others = sorted(
        n for n in os.listdir(path) if n in _PICKLE_NAMES or re.fullmatch(r"pytorch_model-\d+-of-\d+\.bin", n)
    )
    if others:
        raise CheckpointError(
            f"{path!r} has no safetensors weights, only {others}. Pickled weights are never loaded "
            "(unpickling can run arbitrary code). Convert it once, where torch is installed, e.g.\n"
            + CONVERT_SNIPPET.format(path=path)
            + "\n(for ViT use AutoModel or AutoModelForImageClassification), then load the new "
            "directory (copy the tokenizer files along)."
        )
    raise CheckpointError(
        f"{path!r} has no weights: expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} with its shards"
    )


class TensorReader(contextlib.AbstractContextManager):
    """Reads tensors of a checkpoint one at a time; keeps each shard file open while in use.

    Usage: `with TensorReader(find_weight_files(path)) as reader: x = reader.get(name)`.
    """

    def __init__(self, weight_files: dict[str, str]):
        self.weight_files = dict(weight_files)
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, object] = {}

    def __exit__(self, *exc):
        self._stack.close()
        self._handles.clear()
        return None

    def _handle(self, name: str):
        if name not in self.weight_files:
            raise KeyError(name)
        file = self.weight_files[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(open_safetensors(file))
        return self._handles[file]

    def names(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self.weight_files)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_files

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` without reading its data."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a numpy array in its stored dtype.

        Raises:
          CheckpointError naming the file and the tensor when it holds NaN or Inf (checked as it is read: one
          pass over data already in memory, so a corrupt checkpoint fails at load, not as NaN scores later).
        """
        x = self._handle(name).get_tensor(name)
        finite = np.isfinite(x)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise CheckpointError(
                f"{self.weight_files[name]}: tensor {name} {list(x.shape)} holds NaN or Inf "
                f"({bad} of {finite.size} values); the checkpoint is corrupt or was saved after a diverged run"
            )
        return x


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Greedy contiguous sharding: a new shard starts when the next tensor would push the current one past
    `max_shard_size` bytes (a tensor larger than the limit gets a shard of its own), as transformers does."""
    shards: list[list[str]] = [[]]
    current = 0
    for name, nbytes in sizes:
        if shards[-1] and current + nbytes > max_shard_size:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += nbytes
    return shards


def shard_file_names(num_shards: int) -> list[str]:
    """HF shard names: `model.safetensors` alone, else `model-0000i-of-0000n.safetensors`."""
    if num_shards == 1:
        return [SAFE_WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def write_safetensors(
    out_dir: str,
    specs: list[tuple[str, tuple[int, ...], np.dtype]],
    tensor_fn: Callable[[str], np.ndarray],
    max_shard_size: int | str,
    metadata: dict[str, str] | None = None,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> list[str]:
    """Writes tensors into `out_dir` (an existing directory, typically a temporary one), sharded.

    Args:
      out_dir: target directory.
      specs: `(name, shape, dtype)` per tensor in write order; used to plan shards before any data exists.
      tensor_fn: `name -> np.ndarray`, called once per tensor while its shard is being written, so at most one
        shard's tensors are in host memory at a time.
      max_shard_size: bytes (int) or a string like `"2GB"`; above it the weights are split into shards plus
        `model.safetensors.index.json`.
      metadata: safetensors header metadata (transformers needs `{"format": "pt"}`).
      progress: optional wrapper over the shard iterator (e.g. tqdm).
    Returns:
      the file names written.
    """
    limit = parse_size(max_shard_size)
    planned = {name: (tuple(shape), np.dtype(dtype)) for name, shape, dtype in specs}
    if len(planned) != len(specs):
        raise ValueError("duplicate tensor names in specs")
    sizes = {
        name: int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for name, (shape, dtype) in planned.items()
    }
    shards = plan_shards(((name, sizes[name]) for name, _, _ in specs), limit)
    files = shard_file_names(len(shards))
    items: Iterator = iter(zip(files, shards, strict=True))
    if progress is not None:
        items = progress(items)
    weight_map = {}
    for file, names in items:
        tensors = {}
        for name in names:
            tensor = np.ascontiguousarray(tensor_fn(name))
            expected = planned[name]
            if tuple(tensor.shape) != expected[0] or tensor.dtype != expected[1]:
                raise ValueError(
                    f"tensor {name}: produced {tensor.shape} {tensor.dtype}, "
                    f"planned {expected[0]} {expected[1]}"
                )
            tensors[name] = tensor
            weight_map[name] = file
        save_file(tensors, os.path.join(out_dir, file), metadata=metadata)
        del tensors
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        with open(os.path.join(out_dir, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
    return files + ([SAFE_WEIGHTS_INDEX_NAME] if len(files) > 1 else [])
