"""Reading and writing GGUF block tensors as integer codes and affine maps, and decoding any
tensor to floats (formats.md B.4).

`decode_assignment` reads a block-quantized tensor `(out, bytes_per_row)` as its integer codes and
per-sub-block (scale, min) maps (`Assignment`); `encode_assignment` writes one back (e.g. after
refining its codes). `decode_weight` / `decode_tensor` give float32 values: gguf's reference
dequantizer, or gsq's decoder for Q2_0 (which the gguf package lacks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gsq.errors import GSQError
from gsq.gguf.layouts import BlockFields, fp16_exact
from gsq.gguf.types import TYPES, GGUFType, gguf_type, package_lacks

if TYPE_CHECKING:
    from gsq.gguf.reader import GGUFTensor



@dataclass(frozen=True)
class Assignment:
    """What a block-quantized GGUF tensor stores, as integer codes and per-sub-block affine maps.

    `value[r, j] = scale[r, j // sub_block] * codes[r, j] - min[r, j // sub_block]`, evaluated in
    float32 in exactly this order, which is the order of gguf's (and ggml's) dequantizers, so
    `dequantize()` equals `gguf.quants.dequantize` bit for bit, for arbitrary bytes too.

    The per-sub-block maps come from a lattice: `scale = d * sub_scale` and `min = dmin * sub_min`
    (`d`, `dmin` one fp16 per block; `sub_scale`, `sub_min` small integers per sub-block). For the
    fp16 block types `sub_block == block_size`, `sub_scale == 1` and `sub_min == 0` (Q4_1, Q5_1:
    `sub_min == -1`, `dmin` = its `m`). Codes are the decoder's integer levels, in `code_range`:
    signed for symmetric types (Q4_0 -8..7, Q5_0 -16..15, Q8_0, Q2_0/TQ2_0 -1..2, TQ1_0, Q3_K
    -4..3, Q6_K -32..31) and unsigned for the affine ones (Q4_1, Q2_K 0..3, Q4_K 0..15, Q5_1 and
    Q5_K 0..31).
    """

    qtype: str
    codes: np.ndarray  # int16 (out, in)
    d: np.ndarray  # float32 (out, in // block_size), fp16 values
    dmin: np.ndarray  # float32 (out, in // block_size), fp16 values (0 where the type has none)
    sub_scale: np.ndarray  # int16 (out, in // sub_block)
    sub_min: np.ndarray  # int16 (out, in // sub_block)
    block_size: int
    sub_block: int
    code_range: tuple[int, int]

    @property
    def scale(self) -> np.ndarray:
        """float32 (out, in // sub_block): `d * sub_scale`."""
        d = np.repeat(self.d, self.block_size // self.sub_block, axis=1)
        return d * self.sub_scale.astype(np.float32)

    @property
    def min(self) -> np.ndarray:
        """float32 (out, in // sub_block): `dmin * sub_min`."""
        dmin = np.repeat(self.dmin, self.block_size // self.sub_block, axis=1)
        return dmin * self.sub_min.astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """float32 (out, in), bit-equal to the GGUF decoder."""
        scale = np.repeat(self.scale, self.sub_block, axis=1)
        low = np.repeat(self.min, self.sub_block, axis=1)
        return scale * self.codes.astype(np.float32) - low


def _check_data(bt: GGUFType, data: np.ndarray, in_features: int) -> np.ndarray:
    data = np.asarray(data)
    if in_features % bt.block_size:
        raise GSQError(f"row length {in_features} is not a multiple of the {bt.name} block size "
                       f"{bt.block_size}")
    width = in_features // bt.block_size * bt.type_size
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != width:
        raise GSQError(f"{bt.name} data for {in_features} columns must be uint8 (out, {width}); "
                       f"got {data.dtype} {data.shape}")
    return np.ascontiguousarray(data)


def _complete(bt: GGUFType, f: BlockFields) -> BlockFields:
    """Fill the fields a type does not store: sc = 1, m = 0, dmin = 0."""
    n, n_sub = f.d.shape[0], bt.block_size // bt.sub_block
    sc = np.ones((n, n_sub), np.int16) if f.sc is None else f.sc
    m_ = np.zeros((n, n_sub), np.int16) if f.m is None else np.broadcast_to(f.m, (n, n_sub))
    dmin = np.zeros(n, np.float16) if f.dmin is None else f.dmin
    return BlockFields(f.q, f.d, dmin, sc, m_)


def _assignment(bt: GGUFType, data: np.ndarray, in_features: int) -> Assignment:
    rows, nb = data.shape[0], in_features // bt.block_size
    f = _complete(bt, bt.unpack(data.reshape(-1, bt.type_size)))
    return Assignment(
        qtype=bt.name,
        codes=f.q.reshape(rows, in_features),
        d=f.d.astype(np.float32).reshape(rows, nb),
        dmin=f.dmin.astype(np.float32).reshape(rows, nb),
        sub_scale=f.sc.astype(np.int16).reshape(rows, -1),
        sub_min=f.m.astype(np.int16).reshape(rows, -1),
        block_size=bt.block_size,
        sub_block=bt.sub_block,
        code_range=bt.code_range,
    )


def decode_assignment(qtype: str, data: np.ndarray, in_features: int) -> Assignment:
    """Codes and per-sub-block affine maps of a block-quantized tensor `(out, bytes_per_row)`."""
    bt = gguf_type(qtype)
    if bt.family == "float":
        raise GSQError(f"{bt.name} stores plain values: it has no codes or scales to decode")
    return _assignment(bt, _check_data(bt, data, in_features), in_features)


def _fields_of(bt: GGUFType, a: Assignment) -> BlockFields:
    """Inverse of `_assignment`; GSQError where a field is outside what the type stores."""
    lo, hi = bt.code_range
    sub_ok = {"fp16": (1, 1), "signed_k": bt.k_range, "affine_k": (0, bt.k_range[1])}[bt.family]
    min_ok = (-1, -1) if bt.zero_point else (0, 0) if bt.family != "affine_k" else sub_ok
    checks = {
        f"codes outside {lo}..{hi}": (a.codes < lo) | (a.codes > hi),
        f"sub-block scales outside {sub_ok[0]}..{sub_ok[1]}": (a.sub_scale < sub_ok[0])
        | (a.sub_scale > sub_ok[1]),
        f"sub-block mins outside {min_ok[0]}..{min_ok[1]}": (a.sub_min < min_ok[0])
        | (a.sub_min > min_ok[1]),
        "d or dmin not fp16 values": ~(fp16_exact(a.d) & fp16_exact(a.dmin)),
    }
    for reason, bad in checks.items():
        if bad.any():
            raise GSQError(f"cannot write a {bt.name} assignment: {reason}")
    n_sub = bt.block_size // bt.sub_block
    return BlockFields(
        a.codes.reshape(-1, bt.block_size),
        a.d.astype(np.float16).reshape(-1),
        a.dmin.astype(np.float16).reshape(-1),
        a.sub_scale.reshape(-1, n_sub).astype(np.int32),
        a.sub_min.reshape(-1, n_sub).astype(np.int32),
    )


def encode_assignment(a: Assignment) -> np.ndarray:
    """Bytes `(out, bytes_per_row)` of an `Assignment` (e.g. after refining its codes): the inverse
    of `decode_assignment`. Byte-identical round trip for every type but TQ1_0, whose decoder maps
    several bytes to the same trits (values are identical)."""
    bt = gguf_type(a.qtype)
    if bt.family == "float":
        raise GSQError(f"{bt.name} stores plain values: it has no assignment")
    rows = a.codes.shape[0]
    return bt.pack(_fields_of(bt, a)).reshape(rows, -1)


def decode_weight(qtype: str, data: np.ndarray, in_features: int) -> np.ndarray:
    """float32 `(out, in)` of a GGUF tensor: `gguf.quants.dequantize`, or gsq's decoder for the
    types the gguf package lacks (Q2_0)."""
    import gguf

    bt = gguf_type(qtype)
    data = _check_data(bt, data, in_features)
    if package_lacks(bt.name):
        return _assignment(bt, data, in_features).dequantize()
    values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[bt.name])
    return np.asarray(values, dtype=np.float32).reshape(data.shape[0], in_features)


def decode_tensor(t: GGUFTensor) -> np.ndarray:
    """float32 values of any tensor of a file in `t.shape` (gsq's decoders where the gguf package
    lacks the type, else gguf.quants'); a copy, the file stays read-only."""
    import gguf

    cols = t.shape[-1]
    if t.type_name in TYPES:
        values = decode_weight(t.type_name, t.data, cols)
    else:
        try:
            values = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType[t.type_name])
        except (NotImplementedError, KeyError) as err:
            raise GSQError(f"cannot decode tensor '{t.name}' of type {t.type_name}") from err
    return np.array(values, dtype=np.float32).reshape(t.shape)
