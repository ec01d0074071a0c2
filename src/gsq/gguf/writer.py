"""Writing GGUF files with gguf's `GGUFWriter`: a model file tensor by tensor, or the keys alone.

`write_model_file` writes the header, the keys (name, `{arch}.*` hyper-parameters, file type, the
caller's other keys such as the tokenizer's), the tensor infos, then each tensor's bytes as the
caller produces them, so only one tensor is in memory at a time. It writes to the path it is given;
making that atomic is the caller's business.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gsq.gguf.arch import HParams, add_hparams
from gsq.gguf.reader import field_value
from gsq.gguf.types import type_id

KeyValue = tuple[str, Any, Any, Any]  # (key, value, GGUFValueType, array element type or None)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file to write."""

    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # numpy order
    type_name: str
    nbytes: int


def write_model_file(path: str | Path, hp: HParams, infos: list[TensorInfo],
                     data: Iterable[np.ndarray], *, name: str, file_type: int,
                     keys: list[KeyValue]) -> None:
    """Write a GGUF model file at `path`: `data` yields each tensor's bytes (or a float array)
    in the order of `infos`."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, hp.arch)
    writer.add_name(name)
    writer.add_quantized_by("gsq")
    add_hparams(writer, hp)
    writer.add_file_type(file_type)
    for key, value, vtype, sub in keys:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in infos:
        writer.add_tensor_info(t.name, list(t.shape), np.dtype(np.int8), t.nbytes,
                               raw_dtype=type_id(t.type_name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for array in data:
        writer.write_tensor_data(array)
    writer.close()


@contextmanager
def metadata_only_gguf(fields: dict[str, Any], name: str = "metadata.gguf") -> Iterator[Path]:
    """Yield a GGUF file holding the keys `fields` (from `read_gguf`) and no tensors, in a
    temporary folder removed afterwards.

    transformers' GGUF reader rejects a whole file for one tensor type the `gguf` package lacks
    (Q2_0), but builds a config and a tokenizer from the keys alone, so it is given this copy.
    """
    from gguf import GGUFValueType, GGUFWriter

    with tempfile.TemporaryDirectory(prefix="gsq-gguf-meta-") as tmp:
        path = Path(tmp) / name
        writer = GGUFWriter(path, field_value(fields["general.architecture"]))
        for key, field in fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue  # written by GGUFWriter itself
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field_value(field), field.types[0], sub_type=sub)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        yield path
