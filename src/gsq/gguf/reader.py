"""Reading GGUF files: the keys (gguf's `GGUFReader` fields) and every tensor's raw bytes, for any
type id, including the types the `gguf` package lacks (Q2_0).

gguf's reader refuses a whole file for one tensor type id it does not know, and has no public
way to list tensor infos without building them. So the tensor-info table, a fixed record per
tensor after the keys (name, dims, type id, offset: the GGUF specification), is read here; the
keys are read by `GGUFReader`, from the file itself when the gguf package knows every tensor
type, else from a copy of the key section alone (a tensor-less header).
"""

from __future__ import annotations

import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gsq.errors import GSQError
from gsq.gguf.types import package_lacks, row_bytes, type_name

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF value type -> bytes of one scalar (8: string, 9: array are walked separately)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: raw bytes `data` uint8 [rows, bytes_per_row] (rows = product of
    all but the fastest dimension), `shape` in numpy order ([out, in] for a weight) and the
    absolute byte `offset` of its data in the file."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    data: np.ndarray
    offset: int = 0


@dataclass(frozen=True)
class _Info:
    name: str
    dims: tuple[int, ...]  # fastest first, as stored
    type_id: int
    offset: int  # relative to the start of the data section


class _Cursor:
    """Little-endian reads from a byte buffer; struct.error past its end."""

    def __init__(self, buf: np.ndarray) -> None:
        self.buf, self.pos = memoryview(buf), 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string past the end of the file")
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return text

    def skip_value(self, vtype: int) -> None:
        if vtype == _STRING:
            n = self.take("Q")  # not `self.pos += self.take(...)`: take() moves pos first
            self.pos += n
        elif vtype == _ARRAY:
            etype, count = self.take("IQ")
            if etype in _SCALAR_BYTES:
                self.pos += _SCALAR_BYTES[etype] * count
            else:
                for _ in range(count):
                    self.skip_value(etype)
        elif vtype in _SCALAR_BYTES:
            self.pos += _SCALAR_BYTES[vtype]
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")


def _walk(buf: np.ndarray) -> tuple[int, list[_Info], int]:
    """(end of the key section, tensor infos, start of the data section) of a GGUF file."""
    cur = _Cursor(buf)
    if bytes(cur.buf[:4]) != _MAGIC:
        raise ValueError("GGUF magic invalid")
    cur.pos = 4
    version = cur.take("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (only little-endian versions 2 and 3 are read)")
    n_tensors, n_kv = cur.take("QQ")
    alignment = _DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key, vtype = cur.string(), cur.take("I")
        if key == "general.alignment" and vtype == _UINT32:
            alignment = cur.take("I")
        else:
            cur.skip_value(vtype)
    kv_end = cur.pos
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("I")
        dims = tuple(int(d) for d in struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.pos))
        cur.pos += 8 * n_dims
        tid, offset = cur.take("IQ")
        infos.append(_Info(name, dims, tid, offset))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"invalid alignment {alignment}")
    return kv_end, infos, -(-cur.pos // alignment) * alignment


def _tensor(buf: np.ndarray, start: int, info: _Info) -> GGUFTensor:
    """One tensor info -> GGUFTensor with a view of its bytes (checked against the file size)."""
    rows = int(np.prod(info.dims[1:])) if len(info.dims) > 1 else 1
    width = row_bytes(info.type_id, info.dims[0])
    begin = start + info.offset
    if begin + rows * width > len(buf):
        raise GSQError(f"tensor '{info.name}' runs past the end of the file")
    data = buf[begin:begin + rows * width].reshape(rows, width)
    return GGUFTensor(info.name, type_name(info.type_id), tuple(reversed(info.dims)), data, begin)


def _key_fields(path: Path, buf: np.ndarray, kv_end: int, n_tensors: int) -> dict[str, Any]:
    """GGUFReader's fields of a file whose tensor types the gguf package lacks: read from a copy
    of its key section (tensor count 0), with the parts copied out of the temporary file."""
    from gguf import GGUFReader
    from gguf.gguf_reader import ReaderField

    header = bytearray(buf[:kv_end])
    header[8:16] = struct.pack("<Q", 0)
    with tempfile.TemporaryDirectory(prefix="gsq-gguf-keys-") as tmp:
        copy = Path(tmp) / path.name
        copy.write_bytes(bytes(header))
        reader = GGUFReader(copy)
        fields = {k: ReaderField(f.offset, f.name, [np.array(p) for p in f.parts], f.data,
                                 f.types) for k, f in reader.fields.items()}
        del reader
    count = fields["GGUF.tensor_count"]
    fields["GGUF.tensor_count"] = count._replace(parts=[np.array([n_tensors], np.uint64)])
    return fields


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(fields, tensors) of a GGUF file; fields map key -> gguf.ReaderField.

    GSQError if the file is missing, not GGUF, truncated, or holds an unknown tensor type.
    """
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise GSQError(f"GGUF file '{path}' does not exist")
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
        kv_end, infos, start = _walk(buf)
        tensors = [_tensor(buf, start, info) for info in infos]
        if any(package_lacks(t.type_name) for t in tensors):
            fields = _key_fields(path, buf, kv_end, len(infos))
        else:
            fields = dict(GGUFReader(path).fields)
    except GSQError as err:
        raise GSQError(f"cannot read GGUF file '{path}': {err}") from err
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError, struct.error) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GSQError(
            f"cannot read GGUF file '{path}' (truncated or not GGUF?): {reason}") from err
    return fields, tensors


def tensor_offsets(path: str | Path) -> dict[str, int]:
    """Absolute byte offset of every tensor's data in a GGUF file."""
    return {t.name: t.offset for t in read_gguf(path)[1]}


def field_value(field: Any) -> Any:
    """A reader field's value (str, number, bool or list)."""
    return field.contents()


def missing_types(tensors: list[GGUFTensor]) -> list[str]:
    """Tensor types of a file that the `gguf` package (and so transformers' GGUF reader) lacks,
    e.g. ['Q2_0']; gsq's own decoders read them (`decode_tensor`)."""
    return sorted({t.type_name for t in tensors if package_lacks(t.type_name)})
