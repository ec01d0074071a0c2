"""safetensors files written one tensor at a time, and the shard layout of a checkpoint folder.

`write_safetensors` takes `TensorEntry`s (name, dtype, shape and a loader) and writes the header
first, then each tensor as it is loaded, so a file larger than memory (all codes of a 70B model, a
block copied from a source checkpoint) never has to be held at once. The file is the standard
format (8-byte header length, JSON header, data; tensors sorted by name, the header padded with
spaces to 8 bytes): `safetensors.safe_open` / `load_file` and transformers read it. Writing goes to
a temporary name, fsync'ed, then renamed, so a killed write leaves no truncated file behind.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gsq.errors import GSQError

INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names <-> torch dtypes (the ones checkpoints and gsq use)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """A tensor to write: its name, dtype and shape, and how to get its values (any device)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], Tensor]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


def entries_of(tensors: dict[str, Tensor]) -> list[TensorEntry]:
    """Entries for tensors already in memory."""
    return [TensorEntry(name, t.dtype, tuple(t.shape), lambda t=t: t)
            for name, t in tensors.items()]


def write_safetensors(path: str | Path, entries: Iterable[TensorEntry]) -> int:
    """Write `entries` (sorted by name) to `path` atomically; returns the data bytes written.

    Each entry is loaded, checked against its declared dtype and shape, written, and dropped
    before the next one."""
    path = Path(path)
    entries = sorted(entries, key=lambda e: e.name)
    header, offset = {}, 0
    for e in entries:
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for e in entries:
            value = e.load().detach()
            if value.dtype != e.dtype or tuple(value.shape) != e.shape:
                raise GSQError(f"tensor '{e.name}' is {value.dtype} {list(value.shape)}, "
                               f"expected {e.dtype} {list(e.shape)}")
            f.write(_raw_bytes(value))
            del value
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return offset


def _raw_bytes(value: Tensor):
    """The tensor's bytes in C order, little-endian (as safetensors stores them), as a buffer
    (no copy of a host tensor)."""
    flat = value.cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def read_header(path: str | Path) -> dict[str, dict]:
    """name -> {"dtype", "shape", "data_offsets"} of a safetensors file (metadata left out)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                raise ValueError("header larger than 100 MiB")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as err:
        raise GSQError(f"cannot read safetensors file '{path}': {err}") from err
    header.pop("__metadata__", None)
    return header


def read_tensor(path: str | Path, name: str) -> Tensor:
    """One tensor of a safetensors file, in its stored dtype, on the host."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def file_entries(path: str | Path) -> list[TensorEntry]:
    """Entries for every tensor of a safetensors file, each read when written."""
    return [TensorEntry(name, DTYPES[info["dtype"]], tuple(info["shape"]),
                        lambda name=name: read_tensor(path, name))
            for name, info in read_header(path).items()]


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> shard file of the safetensors checkpoint in `folder` (from its index, or
    from the headers of its *.safetensors files); empty when it has none."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise GSQError(f"cannot read '{index}': {err}") from err
        return {name: folder / file for name, file in weight_map.items()}
    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name in read_header(path):
            files[name] = path
    return files


def write_index(folder: str | Path, shards: Iterable[str]) -> dict[str, str]:
    """Write `model.safetensors.index.json` for the shard files `shards` in `folder`; returns its
    weight map."""
    folder = Path(folder)
    weight_map, total = {}, 0
    for shard in shards:
        for name, info in read_header(folder / shard).items():
            weight_map[name] = shard
            begin, end = info["data_offsets"]
            total += end - begin
    index = {"metadata": {"total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
