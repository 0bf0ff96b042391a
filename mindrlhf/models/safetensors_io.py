"""Reading Hugging Face safetensors checkpoints as float32 NumPy arrays, bf16 included.

``safetensors.numpy`` cannot load bf16 (NumPy has no such dtype) and most released models are
stored in bf16, so the format is read here directly: an 8-byte little-endian header length, a
JSON header naming each tensor's dtype, shape and byte range, then the bytes. bf16 widens to
float32 exactly (its bits are the top half of a float32). Sharded checkpoints are read through
``model.safetensors.index.json``; every error names the file and the tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A weight file is missing, malformed or does not hold what it claims; names file and
    tensor."""


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointError(f"{path}: header length {n} exceeds the file ({size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    data = (
        np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        if size > 8 + n
        else np.zeros(0, np.uint8)
    )
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = (
            info.get("dtype"),
            info.get("shape"),
            info.get("data_offsets", (0, 0)),
        )
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has dtype {dtype}; weights must be F32, F16 or BF16"
            )
        itemsize = np.dtype(FLOAT_DTYPES[dtype]).itemsize
        count = int(np.prod(shape)) if shape else 1
        if end - start != count * itemsize or end > len(data):
            raise CheckpointError(
                f"{path}: tensor {name} ({dtype} {shape}) does not fit its byte range "
                f"{start}..{end} of {len(data)}"
            )
        raw = np.frombuffer(data[start:end], dtype=FLOAT_DTYPES[dtype])
        if dtype == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.astype(np.float32)
        out[name] = arr.reshape(shape)
    return out


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory: those its index names (all must exist), else
    model.safetensors, else every *.safetensors."""
    model_dir = Path(model_dir)
    idx = model_dir / INDEX
    if idx.exists():
        try:
            weight_map = json.loads(idx.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{idx}: not a safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(
                f"{idx}: shard(s) {missing} listed in the index are missing from {model_dir}"
            )
        return [model_dir / f for f in files]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no model.safetensors, no {INDEX} and no *.safetensors")
    return files


def read_checkpoint_dir(model_dir: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a (possibly sharded) safetensors model directory, as float32; with an index,
    each tensor must be in the shard the index names."""
    model_dir = Path(model_dir)
    idx = model_dir / INDEX
    weight_map = json.loads(idx.read_text())["weight_map"] if idx.exists() else None
    tensors: dict[str, np.ndarray] = {}
    for f in weight_files(model_dir):
        part = read_safetensors(f)
        if weight_map is not None:
            stray = [k for k in part if weight_map.get(k) != f.name]
            if stray:
                raise CheckpointError(f"{f}: holds {stray[:3]} that {idx.name} puts elsewhere")
        tensors.update(part)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise CheckpointError(f"{idx}: names tensors no shard holds: {absent[:5]}")
    return tensors
