"""The quantized-model directory: what `gsq quantize` writes and `gsq eval` / transformers read.

Layout:
  config.json, model safetensors (one file, or one shard per block with an index), tokenizer files
      a plain Hugging Face checkpoint whose quantized linears hold the dequantized weights
      W_r = s·codes in the checkpoint's dtype (`gsq quantize` keeps the source's: exact in fp32,
      the nearest bf16 value in bf16; `load_quantized` rebuilds the exact values from the codes)
  gsq_codes.safetensors
      "<module>.codes" int8 (out, in) and "<module>.scale" bfloat16 (out, in / group_size);
      float32 scales for modules with a GGUF target (lattice values d*k need not be bf16 values)
  gsq_config.json
      format version, the run's config, and per module: bits, group size, shape (and the GGUF
      target type, when there is one)
  report.json
      per block/stage losses and times; totals
`save_quantized` writes a model held in memory under a temporary name next to the target and
renames it at the end; `gsq quantize` builds its output block by block in `OUT.partial/`
(`gsq.io.partial`). Either way an interrupted or failed run leaves nothing at the target path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from gsq.errors import GSQError
from gsq.io.shards import entries_of, file_entries, read_header, write_safetensors
from gsq.quant.types import QuantizedWeight, QuantSpec, parse_bits

FORMAT_NAME = "gsq-quantized"
FORMAT_VERSION = 1
CODES_FILE = "gsq_codes.safetensors"
META_FILE = "gsq_config.json"
REPORT_FILE = "report.json"


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def check_output_path(out: str | Path, overwrite: bool = False) -> Path:
    """Fail early if `out` exists (unless overwrite) or its parent cannot be written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise GSQError(f"output path '{out}' already exists (pass --overwrite to replace it)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise GSQError(f"output folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise GSQError(f"output folder '{parent}' is not writable")
    return out


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; rename it to `out` only if the block succeeds."""
    out = check_output_path(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_output_file(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `out`; rename it to `out` only if the block succeeds."""
    out = check_output_path(out, overwrite)
    if out.is_dir():
        raise GSQError(f"output path '{out}' is a directory")
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def records_to_tensors(records: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, qw in records.items():
        tensors[f"{name}.codes"] = qw.codes.to(torch.int8).contiguous().cpu()
        tensors[f"{name}.scale"] = scale_tensor(qw)
    return tensors


def scale_tensor(qw: QuantizedWeight) -> torch.Tensor:
    """A record's scales as stored: exact, since they lie on the bf16 grid, or on a target's
    lattice (kept in fp32)."""
    dtype = torch.float32 if qw.spec.target else torch.bfloat16
    return qw.scale.to(dtype).contiguous().cpu()


def module_meta(qw: QuantizedWeight) -> dict:
    meta = {"bits": qw.spec.bits, "group_size": qw.spec.group_size, "shape": list(qw.shape)}
    if qw.spec.target:
        meta["target"] = qw.spec.target
    return meta


def save_quantized(out: str | Path, model: nn.Module, tokenizer,
                   records: dict[str, QuantizedWeight], config: dict, report: dict,
                   overwrite: bool = False) -> Path:
    """Write the quantized model directory atomically (see module docstring)."""
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config,
        "modules": {name: module_meta(qw) for name, qw in records.items()},
    }
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(records_to_tensors(records), str(tmp / CODES_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return Path(out)


class CodesFile:
    """The records of a gsq directory, read module by module when asked for (all codes of a 70B
    model, 70 GB of int8, are never held at once): specs from gsq_config.json, codes and scales
    from gsq_codes.safetensors."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        try:
            meta = json.loads((path / META_FILE).read_text())
            self.header = read_header(path / CODES_FILE)
        except (OSError, ValueError, GSQError) as err:
            raise GSQError(f"cannot read gsq quantized directory '{path}': {err}") from err
        if meta.get("format") != FORMAT_NAME or meta.get("format_version") != FORMAT_VERSION:
            raise GSQError(
                f"'{path}' is not a gsq quantized directory of format version {FORMAT_VERSION}")
        self.path = path / CODES_FILE
        self.specs = {name: QuantSpec(parse_bits(info["bits"]), int(info["group_size"]),
                                      info.get("target"))
                      for name, info in meta["modules"].items()}

    def scale_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[f"{name}.scale"]["shape"])

    def read(self, names: list[str]) -> dict[str, QuantizedWeight]:
        """The records `names` (fp32 scales, int8 codes, on the host)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return {name: QuantizedWeight(f.get_tensor(f"{name}.codes"),
                                          f.get_tensor(f"{name}.scale").float(), self.specs[name])
                    for name in names}


def load_records(path: str | Path) -> dict[str, QuantizedWeight]:
    """The codes and scales of every quantized module in a gsq directory."""
    codes = CodesFile(path)
    return codes.read(list(codes.specs))


def rewrite_tensors(out: str | Path, changes: Iterable[tuple[str, dict[str, torch.Tensor]]],
                    report: dict) -> None:
    """Replace tensors of `out`'s safetensors files, atomically: `changes` yields (file name,
    {tensor name: new value, same dtype and shape}), one file at a time so that only one file's
    new tensors are held; the other tensors of a changed file are copied one at a time, every
    other file is linked (or copied) unchanged, and report.json is written anew. The new
    directory is built beside `out` and replaces it at the end (`atomic_output_dir`)."""
    out = Path(out)
    with atomic_output_dir(out, overwrite=True) as tmp:
        changed = set()
        for name, new in changes:
            entries = file_entries(out / name)
            unknown = set(new) - {e.name for e in entries}
            if unknown:
                raise GSQError(f"'{out / name}' holds no tensor '{sorted(unknown)[0]}'")
            write_safetensors(tmp / name, [entries_of({e.name: new[e.name]})[0]
                                           if e.name in new else e for e in entries])
            changed.add(name)
        for path in out.iterdir():
            if path.name not in changed and path.name != REPORT_FILE:
                _link_or_copy(path, tmp / path.name)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)  # the old directory is removed: the new one keeps the file
    except OSError:
        shutil.copy2(src, dst)
