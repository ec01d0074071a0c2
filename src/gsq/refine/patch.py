"""Writing a refined GGUF file: each refined tensor re-encoded in its own type and checked to
decode to the weight gsq evaluated, patched into a copy of the input at its offset (same size,
every other byte identical)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from gsq.errors import GSQError
from gsq.gguf import TYPES, Assignment, decode_weight, encode_assignment, rotary_rows
from gsq.io.quantized_dir import atomic_output_file
from gsq.quant.affine import FULL_RELAXATION_MAX_CODES, AffineWeight
from gsq.refine.plan import FileLinear, Plan, permute_assignment


def encode_target(target: FileLinear, record: AffineWeight) -> tuple[np.ndarray, int, int]:
    """Bytes of the refined tensor in its own type (file row order), and how many codes and
    sub-block scales changed.

    GSQError if the bytes do not decode to exactly `record.dequantize()` (HF rows) or their size
    differs from the original."""
    a = target.assignment()
    codes = record.codes.cpu().numpy().astype(np.int16)
    new = dataclasses.replace(a, codes=codes)
    if record.train_scale:
        new = _with_q2k_scales(new, record.scale.cpu().numpy())
    scales_changed = int((new.sub_scale != a.sub_scale).sum())
    data = encode_assignment(permute_assignment(new, target.heads, False))
    t = target.tensor
    if data.shape != t.data.shape:
        raise GSQError(f"internal error: re-encoded '{t.name}' has shape {data.shape}, the file "
                       f"{t.data.shape}")
    decoded = decode_weight(t.type_name, data, t.shape[1])
    want = record.dequantize().cpu().numpy()
    if target.heads:
        decoded = rotary_rows(decoded, target.heads, True)
    if not np.array_equal(decoded, want):
        raise GSQError(f"internal error: re-encoded '{t.name}' does not decode to gsq's weight")
    return data, int((codes != a.codes).sum()), scales_changed


def encode_all(plan: Plan, records: dict[str, AffineWeight]) -> tuple[dict, dict]:
    """Bytes of every refined tensor whose codes or scales changed, and the report entry of every
    refined tensor, by `FileLinear.key` (the GGUF name; `name[e]` for expert e's slice)."""
    patches, entries = {}, {}
    for module, target in plan.targets.items():
        data, changed, scales_changed = encode_target(target, records[module])
        if changed or scales_changed:
            patches[target.key] = data
        entries[target.key] = _tensor_entry(target, changed, scales_changed)
    return patches, entries


def _with_q2k_scales(a: Assignment, scale: np.ndarray) -> Assignment:
    """Q2_K fields d, sub_scale for snapped sub-block scales `(out, in/16)`."""
    from gsq.export.gguf_lattice import fit_lattice

    t = scale.astype(np.float32).reshape(scale.shape[0], -1, 16)
    fit = fit_lattice(t, 0, 15)
    if not fit.ok.all():
        raise GSQError("internal error: trained Q2_K scales are not on the 4-bit lattice")
    return dataclasses.replace(a, d=fit.step.astype(np.float32),
                               sub_scale=fit.k.astype(np.int16).reshape(a.sub_scale.shape))


def write_patched(src: Path, out: Path, patches: dict[str, np.ndarray], offsets: dict[str, int],
                  originals: dict[str, np.ndarray], overwrite: bool) -> int:
    """Copy `src` to `out` (atomically) with the bytes of the patched tensors replaced in place.

    Each patch is checked against the bytes at its offset first (the offsets are right) and must
    have the original's size, so the file keeps its size and layout. Returns the file size."""
    raw = np.memmap(src, dtype=np.uint8, mode="r")
    for name, data in patches.items():
        start, old = offsets[name], originals[name]
        if data.nbytes != old.nbytes or not np.array_equal(raw[start:start + old.nbytes],
                                                           old.reshape(-1)):
            raise GSQError(f"internal error: tensor '{name}' is not where the file says")
    del raw
    with atomic_output_file(out, overwrite) as tmp:
        shutil.copyfile(src, tmp)
        with open(tmp, "r+b") as f:
            for name, data in sorted(patches.items(), key=lambda kv: offsets[kv[0]]):
                f.seek(offsets[name])
                f.write(np.ascontiguousarray(data).tobytes())
        size = tmp.stat().st_size
        if size != src.stat().st_size:
            raise GSQError(f"internal error: the refined file has {size} bytes, the input "
                           f"{src.stat().st_size}")
    return size


def write_report(path: Path, report: dict) -> None:
    """JSON beside the output, written under a temporary name and renamed."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.resolve().parent)
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(name, path)


def _tensor_entry(target: FileLinear, changed: int, scales_changed: int) -> dict:
    lo, hi = TYPES[target.tensor.type_name].code_range
    numel = int(np.prod(target.tensor.shape))
    return {"module": target.module, "type": target.tensor.type_name,
            "relaxation": "full" if hi - lo + 1 <= FULL_RELAXATION_MAX_CODES else "shift",
            "scales": "trained" if target.train_scale else "frozen", "codes": numel,
            "changed_codes": changed, "changed_fraction": changed / max(numel, 1),
            "changed_sub_scales": scales_changed}
