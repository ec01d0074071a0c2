"""GGUF block encoding of gsq quantized weights, exact by construction (formats.md B.4-B.6).

`encode_weight` turns a `QuantizedWeight` (codes `c`, per-group scales `s`) into the bytes of one
GGUF tensor, `(out, bytes_per_row)` uint8, whose dequantization equals `s*c` in float32 (values
compared with ==; the sign of a zero is not preserved). Blocks are built from our codes and scales,
never by the `gguf` package's quantizers (they re-round). `decode_weight` / `decode_assignment`
read such bytes back; `gguf.quants.dequantize` is the reference decoder (it lacks Q2_0).

Block layouts (offsets in bytes, little-endian; `e` = element in block, `n = e//128`, `r = e%128`):

| type  | elems | bytes | layout                                            | value             |
|-------|-------|-------|---------------------------------------------------|-------------------|
| Q4_0  | 32    | 18    | d f16, qs[16]: e<16 low nibble, e+16 high nibble   | d*(q-8)           |
| Q4_1  | 32    | 20    | d f16, m f16, qs[16] as Q4_0                        | d*q + m           |
| Q5_0  | 32    | 22    | d f16, qh u32 (bit e: q >> 4), qs[16] as Q4_0       | d*(q-16)          |
| Q5_1  | 32    | 24    | d f16, m f16, qh u32, qs[16] as Q5_0                | d*q + m           |
| Q8_0  | 32    | 34    | d f16, int8 q[32]                                   | d*q               |
| Q2_0  | 64    | 18    | d f16, qs[16]: q = qs[e//4] >> 2(e%4)               | d*(q-1)           |
| TQ1_0 | 256   | 54    | qs[48], qh[4] base-3 bytes (5 and 4 trits), d f16  | d*(t-1)           |
| TQ2_0 | 256   | 66    | qs[64]: q = qs[32n + r%32] >> 2(r//32), d f16       | d*(q-1)           |
| Q2_K  | 256   | 84    | scales[16] (sc lo / m hi nibble), qs[64] as TQ2_0,  | d*sc*q - dmin*m   |
|       |       |       | d f16, dmin f16; 16 sub-blocks of 16                |                   |
| Q3_K  | 256   | 110   | hmask[32], qs[64] low 2 bits, scales[12] 6-bit      | d*(L-32)*q,       |
|       |       |       | L = sc+32, d f16; q = low - 4(1-h), 16 subs of 16   | q in -4..3        |
| Q4_K  | 256   | 144   | d, dmin f16, scales[12] 6-bit sc/m, qs[128]; 8x32   | d*sc*q - dmin*m   |
| Q5_K  | 256   | 176   | d, dmin, scales[12] as Q4_K, qh[32]: element 32j+b  | d*sc*q - dmin*m   |
|       |       |       | has bit 4 = bit j of qh[b], qs[128] low bits as Q4_K|                   |
| Q6_K  | 256   | 210   | ql[128], qh[64], int8 scales[16], d f16; 16 x 16    | d*sc*(q-32)       |

Which of our grids a type holds exactly (B.5): fp16-block types need `s` fp16-representable and
one `|s|` per block (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 any grid; Q2_0/TQ2_0 2-bit either sign and
ternary; TQ1_0 ternary); K types need each super-block's sub-block scales on a lattice `{d*k}`
(`gguf_lattice.py`; Q5_K's 32 levels hold 4-bit codes of either sign through the offset 16).
Everything here is data-driven: an all-zero group never constrains its scale, and codes only need
to fit the type where they actually occur.

API: `encode_weight`, `exact_problem`, `default_type` (smallest exact type by bits per weight:
TQ1_0 < TQ2_0 < Q2_0 < Q2_K < Q3_K < Q4_0 < Q4_K < Q5_0 < Q5_K < Q5_1 < Q6_K < Q8_0 < F16 <
BF16 < F32), `decode_weight`, `snap_scales` (project scales onto a type), `decode_assignment` /
`encode_assignment` (a file's integer codes and per-sub-block affine maps, for refinement),
`encoding_error`, and the `BLOCK_TYPES` table (type ids, block sizes, bits per weight).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gguf
import numpy as np
import torch
from torch import Tensor

from gsq.errors import GSQError
from gsq.export.gguf_lattice import (
    FP16_MAX,
    fp16_exact,
    fp16_nearest,
    lattice_ratios,
    orient_range,
    plan_affine,
    snap_lattice,
)
from gsq.quant.types import TERNARY, QuantizedWeight, QuantSpec

__all__ = [
    "Assignment",
    "BLOCK_TYPES",
    "BlockType",
    "EncodingError",
    "block_type",
    "decode_assignment",
    "decode_weight",
    "default_type",
    "encode_assignment",
    "encode_weight",
    "encoding_error",
    "exact_problem",
    "snap_scales",
]

logger = logging.getLogger(__name__)

QK_K = 256  # elements per K-quant / TQ super-block
_CHUNK_ELEMENTS = 1 << 20  # rows are fitted in chunks of about this many weights
_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)
_SHIFT4 = np.array([0, 4], dtype=np.uint8)


@dataclass(frozen=True)
class BlockType:
    """One GGUF tensor type as this module encodes it."""

    name: str
    type_id: int  # ggml type id of the tensor info (Q2_0 = 42 is not in gguf 0.19.0)
    block_size: int  # elements per block (1 for float types)
    type_size: int  # bytes per block
    family: str  # "float", "fp16" (one fp16 d per block), "signed_k" / "affine_k" (lattice)
    sub_block: int = 1  # elements sharing one scale: the block, or a K sub-block
    code_range: tuple[int, int] = (0, 0)  # levels the decoder multiplies (Assignment.codes)
    fit_range: tuple[int, int] = (0, 0)  # fp16 types: oriented codes c' with w = d*c'
    signs: tuple[int, ...] = (1, -1)  # fp16 types: d = sign*s, tried in this order
    zero_point: int = 0  # Q4_1 / Q5_1: q = c' + 8 / 16 and m = -8d / -16d
    k_range: tuple[int, int] = (0, 0)  # K types: sub-block integer scale range
    offsets: tuple[int, ...] = ()  # affine K types: uniform offsets Z, by preference
    max_bits: int | str = 4  # widest gsq grid the type holds (target of lossy re-fits)

    @property
    def bpw(self) -> float:
        """Bits per weight, scales included."""
        return 8.0 * self.type_size / self.block_size


BLOCK_TYPES: dict[str, BlockType] = {
    t.name: t
    for t in (
        BlockType("F32", 0, 1, 4, "float"),
        BlockType("F16", 1, 1, 2, "float"),
        BlockType("BF16", 30, 1, 2, "float"),
        BlockType("Q4_0", 2, 32, 18, "fp16", 32, (-8, 7), (-8, 7)),
        BlockType("Q4_1", 3, 32, 20, "fp16", 32, (0, 15), (-8, 7), zero_point=8),
        BlockType("Q5_0", 6, 32, 22, "fp16", 32, (-16, 15), (-16, 15)),
        BlockType("Q5_1", 7, 32, 24, "fp16", 32, (0, 31), (-16, 15), zero_point=16),
        BlockType("Q8_0", 8, 32, 34, "fp16", 32, (-128, 127), (-128, 127)),
        BlockType("Q2_0", 42, 64, 18, "fp16", 64, (-1, 2), (-1, 2), (-1, 1), max_bits=2),
        BlockType("TQ1_0", 34, 256, 54, "fp16", 256, (-1, 1), (-1, 1), max_bits=TERNARY),
        BlockType("TQ2_0", 35, 256, 66, "fp16", 256, (-1, 2), (-1, 2), (-1, 1), max_bits=2),
        BlockType("Q2_K", 10, 256, 84, "affine_k", 16, (0, 3), k_range=(0, 15), offsets=(2, 1),
                  max_bits=2),
        BlockType("Q3_K", 11, 256, 110, "signed_k", 16, (-4, 3), k_range=(-32, 31), max_bits=3),
        BlockType("Q4_K", 12, 256, 144, "affine_k", 32, (0, 15), k_range=(0, 63),
                  offsets=(8, 4, 2, 1)),
        BlockType("Q5_K", 13, 256, 176, "affine_k", 32, (0, 31), k_range=(0, 63),
                  offsets=(16, 8, 4, 2, 1)),
        BlockType("Q6_K", 14, 256, 210, "signed_k", 16, (-32, 31), k_range=(-128, 127)),
    )
}
# default_type tries these in order: by bits per weight, fp16-scale types before K types on ties
_DEFAULT_ORDER = ("TQ1_0", "TQ2_0", "Q2_0", "Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q5_0", "Q5_K",
                  "Q5_1", "Q6_K", "Q8_0", "F16", "BF16", "F32")


def block_type(qtype: str) -> BlockType:
    """The `BlockType` named `qtype` (case-insensitive); GSQError for unknown names."""
    bt = BLOCK_TYPES.get(str(qtype).upper())
    if bt is None:
        raise GSQError(f"unknown GGUF type {qtype!r}; supported: {', '.join(BLOCK_TYPES)}")
    return bt


class _Misfit(Exception):
    """One-line reason a block type cannot hold a weight exactly."""


# --------------------------------------------------------------------------------------------
# Block fields and byte packing. Every function works on N blocks at once.


@dataclass
class _Fields:
    """A type's stored fields for N blocks, in the decoder's integer terms."""

    q: np.ndarray  # (N, block) int16: the level the decoder multiplies (Assignment.codes)
    d: np.ndarray  # (N,) float16
    dmin: np.ndarray | None = None  # (N,) float16: Q2_K/Q4_K/Q5_K dmin, Q4_1/Q5_1 m
    sc: np.ndarray | None = None  # (N, n_sub) int: K sub-block scale
    m: np.ndarray | None = None  # (N, n_sub) int: Q2_K/Q4_K/Q5_K sub-block min


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return np.asarray(d, dtype="<f2").reshape(-1, 1).view(np.uint8)  # (N, 2)


def _f16_read(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").reshape(-1)  # (N,) from (N, 2)


def _pack_crumbs_k(u: np.ndarray) -> np.ndarray:
    """(N, 256) 2-bit values -> (N, 64): element 128n + 32j + b in byte 32n + b, bits 2j."""
    u = u.astype(np.uint8).reshape(-1, 2, 4, 32)
    return np.bitwise_or.reduce(u << _SHIFT2[:, None], axis=2).reshape(-1, 64)


def _unpack_crumbs_k(qs: np.ndarray) -> np.ndarray:
    return ((qs.reshape(-1, 2, 1, 32) >> _SHIFT2[:, None]) & 3).reshape(-1, 256)


def _pack_q4_0(f: _Fields) -> np.ndarray:
    nib = (f.q + 8).astype(np.uint8)  # (N, 32)
    return np.concatenate([_f16_bytes(f.d), nib[:, :16] | nib[:, 16:] << 4], axis=1)


def _unpack_q4_0(b: np.ndarray) -> _Fields:
    qs = b[:, 2:18]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int16) - 8
    return _Fields(q, _f16_read(b[:, :2]))


def _pack_q4_1(f: _Fields) -> np.ndarray:
    nib = f.q.astype(np.uint8)
    qs = nib[:, :16] | nib[:, 16:] << 4
    return np.concatenate([_f16_bytes(f.d), _f16_bytes(f.dmin), qs], axis=1)


def _unpack_q4_1(b: np.ndarray) -> _Fields:
    qs = b[:, 4:20]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int16)
    m_ = -np.ones((b.shape[0], 1), np.int16)  # value = d*q - (m * -1)
    return _Fields(q, _f16_read(b[:, :2]), _f16_read(b[:, 2:4]), m=m_)


def _nibbles_32(u: np.ndarray) -> np.ndarray:
    """(N, 32) values -> (N, 16) bytes: element e < 16 low nibble of byte e, e + 16 high nibble."""
    return (u[:, :16] & 15) | (u[:, 16:] & 15) << 4


def _fifth_bits_32(u: np.ndarray) -> np.ndarray:
    """(N, 32) 5-bit values -> (N, 4) bytes of the little-endian u32 qh: bit e = bit 4 of e."""
    return np.packbits(u >> 4, axis=1, bitorder="little")


def _unpack_5bit_32(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """qh (N, 4), qs (N, 16) bytes -> (N, 32) int16 levels 0..31 (Q5_0 / Q5_1)."""
    low = np.concatenate([qs & 15, qs >> 4], axis=1)
    high = np.unpackbits(qh, axis=1, bitorder="little")
    return (low | high << 4).astype(np.int16)


def _pack_q5_0(f: _Fields) -> np.ndarray:
    u = (f.q + 16).astype(np.uint8)  # (N, 32), 0..31
    return np.concatenate([_f16_bytes(f.d), _fifth_bits_32(u), _nibbles_32(u)], axis=1)


def _unpack_q5_0(b: np.ndarray) -> _Fields:
    return _Fields(_unpack_5bit_32(b[:, 2:6], b[:, 6:22]) - 16, _f16_read(b[:, :2]))


def _pack_q5_1(f: _Fields) -> np.ndarray:
    u = f.q.astype(np.uint8)
    return np.concatenate([_f16_bytes(f.d), _f16_bytes(f.dmin), _fifth_bits_32(u),
                           _nibbles_32(u)], axis=1)


def _unpack_q5_1(b: np.ndarray) -> _Fields:
    m_ = -np.ones((b.shape[0], 1), np.int16)  # value = d*q - (m * -1), as Q4_1
    return _Fields(_unpack_5bit_32(b[:, 4:8], b[:, 8:24]), _f16_read(b[:, :2]),
                   _f16_read(b[:, 2:4]), m=m_)


def _pack_q8_0(f: _Fields) -> np.ndarray:
    return np.concatenate([_f16_bytes(f.d), f.q.astype(np.int8).view(np.uint8)], axis=1)


def _unpack_q8_0(b: np.ndarray) -> _Fields:
    return _Fields(b[:, 2:34].view(np.int8).astype(np.int16), _f16_read(b[:, :2]))


def _pack_q2_0(f: _Fields) -> np.ndarray:
    u = (f.q + 1).astype(np.uint8).reshape(-1, 16, 4)  # element 4i + j in byte i, bits 2j
    return np.concatenate([_f16_bytes(f.d), np.bitwise_or.reduce(u << _SHIFT2, axis=2)], axis=1)


def _unpack_q2_0(b: np.ndarray) -> _Fields:
    q = ((b[:, 2:18, None] >> _SHIFT2) & 3).reshape(-1, 64).astype(np.int16) - 1
    return _Fields(q, _f16_read(b[:, :2]))


def _trit_bytes(t: np.ndarray) -> np.ndarray:
    """(N, n, w) trits -> (N, w) bytes ceil(v*256/243), v = sum_k t_k 3^(4-k)."""
    power = (3 ** (4 - np.arange(t.shape[1]))).astype(np.uint16)
    v = (t.astype(np.uint16) * power[:, None]).sum(axis=1, dtype=np.uint16)
    return ((v.astype(np.uint32) * 256 + 242) // 243).astype(np.uint8)


def _byte_trits(b: np.ndarray, n: int) -> np.ndarray:
    """(N, w) bytes -> (N, n*w) trits, trit k of byte x = ((x*3^k mod 256) * 3) >> 8."""
    power = (3 ** np.arange(n)).astype(np.uint8)
    x = b[:, None, :] * power[:, None]  # uint8 arithmetic wraps mod 256
    return ((x.astype(np.uint16) * 3) >> 8).reshape(b.shape[0], -1)


def _pack_tq1_0(f: _Fields) -> np.ndarray:
    t = (f.q + 1).astype(np.uint8)  # (N, 256) trits
    qs0 = _trit_bytes(t[:, :160].reshape(-1, 5, 32))  # element 32k + b in byte b
    qs1 = _trit_bytes(t[:, 160:240].reshape(-1, 5, 16))  # element 160 + 16k + b
    qh = _trit_bytes(t[:, 240:].reshape(-1, 4, 4))  # element 240 + 4k + b
    return np.concatenate([qs0, qs1, qh, _f16_bytes(f.d)], axis=1)


def _unpack_tq1_0(b: np.ndarray) -> _Fields:
    t = np.concatenate(
        [_byte_trits(b[:, :32], 5), _byte_trits(b[:, 32:48], 5), _byte_trits(b[:, 48:52], 4)],
        axis=1,
    )
    return _Fields(t.astype(np.int16) - 1, _f16_read(b[:, 52:54]))


def _pack_tq2_0(f: _Fields) -> np.ndarray:
    return np.concatenate([_pack_crumbs_k(f.q + 1), _f16_bytes(f.d)], axis=1)


def _unpack_tq2_0(b: np.ndarray) -> _Fields:
    return _Fields(_unpack_crumbs_k(b[:, :64]).astype(np.int16) - 1, _f16_read(b[:, 64:66]))


def _pack_q2_k(f: _Fields) -> np.ndarray:
    scales = (f.sc | f.m << 4).astype(np.uint8)  # (N, 16)
    return np.concatenate(
        [scales, _pack_crumbs_k(f.q), _f16_bytes(f.d), _f16_bytes(f.dmin)], axis=1
    )


def _unpack_q2_k(b: np.ndarray) -> _Fields:
    q = _unpack_crumbs_k(b[:, 16:80]).astype(np.int16)
    d, dmin = _f16_read(b[:, 80:82]), _f16_read(b[:, 82:84])
    return _Fields(q, d, dmin, sc=b[:, :16] & 15, m=b[:, :16] >> 4)


def _pack_q3_k(f: _Fields) -> np.ndarray:
    u = (f.q + 4).astype(np.uint8)  # (N, 256), 0..7
    h = (u >> 2).reshape(-1, 8, 32)  # element 32j + b: bit j of hmask[b]
    hmask = np.bitwise_or.reduce(h << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    L = (f.sc + 32).astype(np.uint8)  # (N, 16) six-bit
    low = (L[:, :8] & 15) | (L[:, 8:] & 15) << 4
    high = np.bitwise_or.reduce((L >> 4).reshape(-1, 4, 4) << _SHIFT2[:, None], axis=1)
    return np.concatenate([hmask, _pack_crumbs_k(u & 3), low, high, _f16_bytes(f.d)], axis=1)


def _unpack_q3_k(b: np.ndarray) -> _Fields:
    n = b.shape[0]
    h = ((b[:, None, :32] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(n, 256)
    q = _unpack_crumbs_k(b[:, 32:96]).astype(np.int16) - 4 * (1 - h.astype(np.int16))
    sb = b[:, 96:108]
    low = np.concatenate([sb[:, :8] & 15, sb[:, :8] >> 4], axis=1)  # (N, 16)
    high = ((sb[:, None, 8:12] >> _SHIFT2[:, None]) & 3).reshape(n, 16)
    sc = (low | high << 4).astype(np.int16) - 32
    return _Fields(q, _f16_read(b[:, 108:110]), sc=sc)


def _pack_k_scales(sc: np.ndarray, m_: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K scales[12] of six-bit (N, 8) sc and m: bytes 0-3 sc[0:4] | sc[4:8] >> 4 << 6,
    4-7 m[0:4] | m[4:8] >> 4 << 6, 8-11 sc[4:8] & 15 | (m[4:8] & 15) << 4."""
    sc, m_ = sc.astype(np.uint8), m_.astype(np.uint8)
    return np.concatenate([
        sc[:, :4] | (sc[:, 4:] >> 4) << 6,
        m_[:, :4] | (m_[:, 4:] >> 4) << 6,
        (sc[:, 4:] & 15) | (m_[:, 4:] & 15) << 4,
    ], axis=1)


def _unpack_k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 12) scale bytes -> six-bit (sc, m), each (N, 8) uint8."""
    a, bm, c = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([a & 63, (c & 15) | (a >> 2) & 48], axis=1)
    m_ = np.concatenate([bm & 63, (c >> 4) | (bm >> 2) & 48], axis=1)
    return sc, m_


def _pack_nibbles_k(q: np.ndarray) -> np.ndarray:
    """(N, 256) -> (N, 128): element 64c + 32h + b in byte 32c + b, nibble h (low 4 bits)."""
    q = (q.astype(np.uint8) & 15).reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | q[:, :, 1] << 4).reshape(-1, 128)


def _unpack_nibbles_k(qs: np.ndarray) -> np.ndarray:
    return ((qs.reshape(-1, 4, 1, 32) >> _SHIFT4[:, None]) & 15).reshape(-1, 256)


def _pack_q4_k(f: _Fields) -> np.ndarray:
    return np.concatenate([_f16_bytes(f.d), _f16_bytes(f.dmin), _pack_k_scales(f.sc, f.m),
                           _pack_nibbles_k(f.q)], axis=1)


def _unpack_q4_k(b: np.ndarray) -> _Fields:
    sc, m_ = _unpack_k_scales(b[:, 4:16])
    q = _unpack_nibbles_k(b[:, 16:144])
    return _Fields(q.astype(np.int16), _f16_read(b[:, :2]), _f16_read(b[:, 2:4]), sc, m_)


def _pack_q5_k(f: _Fields) -> np.ndarray:
    u = f.q.astype(np.uint8)  # (N, 256), 0..31
    h = (u >> 4).reshape(-1, 8, 32)  # element 32j + b: bit j of qh[b]
    qh = np.bitwise_or.reduce(h << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    return np.concatenate([_f16_bytes(f.d), _f16_bytes(f.dmin), _pack_k_scales(f.sc, f.m), qh,
                           _pack_nibbles_k(u)], axis=1)


def _unpack_q5_k(b: np.ndarray) -> _Fields:
    n = b.shape[0]
    sc, m_ = _unpack_k_scales(b[:, 4:16])
    h = ((b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(n, 256)
    q = (_unpack_nibbles_k(b[:, 48:176]) | h << 4).astype(np.int16)
    return _Fields(q, _f16_read(b[:, :2]), _f16_read(b[:, 2:4]), sc, m_)


def _pack_q6_k(f: _Fields) -> np.ndarray:
    u = (f.q + 32).astype(np.uint8)  # (N, 256), 0..63
    low = (u & 15).reshape(-1, 2, 2, 64)  # element 128n + 64h + b: ql[64n + b], nibble h
    ql = (low[:, :, 0] | low[:, :, 1] << 4).reshape(-1, 128)
    high = (u >> 4).reshape(-1, 2, 4, 32)  # element 128n + 32j + b: qh[32n + b], bits 2j
    qh = np.bitwise_or.reduce(high << _SHIFT2[:, None], axis=2).reshape(-1, 64)
    scales = f.sc.astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh, scales, _f16_bytes(f.d)], axis=1)


def _unpack_q6_k(b: np.ndarray) -> _Fields:
    n = b.shape[0]
    low = ((b[:, :128].reshape(n, 2, 1, 64) >> _SHIFT4[:, None]) & 15).reshape(n, 256)
    high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> _SHIFT2[:, None]) & 3).reshape(n, 256)
    q = (low | high << 4).astype(np.int16) - 32
    return _Fields(q, _f16_read(b[:, 208:210]), sc=b[:, 192:208].view(np.int8).astype(np.int16))


_PACK: dict[str, Callable[[_Fields], np.ndarray]] = {
    "Q4_0": _pack_q4_0, "Q4_1": _pack_q4_1, "Q5_0": _pack_q5_0, "Q5_1": _pack_q5_1,
    "Q8_0": _pack_q8_0, "Q2_0": _pack_q2_0, "TQ1_0": _pack_tq1_0, "TQ2_0": _pack_tq2_0,
    "Q2_K": _pack_q2_k, "Q3_K": _pack_q3_k, "Q4_K": _pack_q4_k, "Q5_K": _pack_q5_k,
    "Q6_K": _pack_q6_k,
}  # fmt: skip
_UNPACK: dict[str, Callable[[np.ndarray], _Fields]] = {
    "Q4_0": _unpack_q4_0, "Q4_1": _unpack_q4_1, "Q5_0": _unpack_q5_0, "Q5_1": _unpack_q5_1,
    "Q8_0": _unpack_q8_0, "Q2_0": _unpack_q2_0, "TQ1_0": _unpack_tq1_0, "TQ2_0": _unpack_tq2_0,
    "Q2_K": _unpack_q2_k, "Q3_K": _unpack_q3_k, "Q4_K": _unpack_q4_k, "Q5_K": _unpack_q5_k,
    "Q6_K": _unpack_q6_k,
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Reading: the integer codes and affine maps a file stores.


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


def _check_data(bt: BlockType, data: np.ndarray, in_features: int) -> np.ndarray:
    data = np.asarray(data)
    if in_features % bt.block_size:
        raise GSQError(f"row length {in_features} is not a multiple of the {bt.name} block size "
                       f"{bt.block_size}")
    width = in_features // bt.block_size * bt.type_size
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != width:
        raise GSQError(f"{bt.name} data for {in_features} columns must be uint8 (out, {width}); "
                       f"got {data.dtype} {data.shape}")
    return np.ascontiguousarray(data)


def _complete(bt: BlockType, f: _Fields) -> _Fields:
    """Fill the fields a type does not store: sc = 1, m = 0, dmin = 0."""
    n, n_sub = f.d.shape[0], bt.block_size // bt.sub_block
    sc = np.ones((n, n_sub), np.int16) if f.sc is None else f.sc
    m_ = np.zeros((n, n_sub), np.int16) if f.m is None else np.broadcast_to(f.m, (n, n_sub))
    dmin = np.zeros(n, np.float16) if f.dmin is None else f.dmin
    return _Fields(f.q, f.d, dmin, sc, m_)


def _assignment(bt: BlockType, data: np.ndarray, in_features: int) -> Assignment:
    rows, nb = data.shape[0], in_features // bt.block_size
    f = _complete(bt, _UNPACK[bt.name](data.reshape(-1, bt.type_size)))
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
    bt = block_type(qtype)
    if bt.family == "float":
        raise GSQError(f"{bt.name} stores plain values: it has no codes or scales to decode")
    return _assignment(bt, _check_data(bt, data, in_features), in_features)


def _fields_of(bt: BlockType, a: Assignment) -> _Fields:
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
    return _Fields(
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
    bt = block_type(a.qtype)
    if bt.family == "float":
        raise GSQError(f"{bt.name} stores plain values: it has no assignment")
    rows = a.codes.shape[0]
    return _PACK[bt.name](_fields_of(bt, a)).reshape(rows, -1)


def decode_weight(qtype: str, data: np.ndarray, in_features: int) -> np.ndarray:
    """float32 `(out, in)` of a GGUF tensor: `gguf.quants.dequantize`, or our decoder for Q2_0."""
    bt = block_type(qtype)
    data = _check_data(bt, data, in_features)
    if bt.name == "Q2_0":  # not in gguf 0.19.0
        return _assignment(bt, data, in_features).dequantize()
    values = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[bt.name])
    return np.asarray(values, dtype=np.float32).reshape(data.shape[0], in_features)


# --------------------------------------------------------------------------------------------
# Exact fitting: our (codes, scales) -> a type's fields, or a _Misfit naming the first problem.


def _cols(c0: int, n: int) -> str:
    return f"columns {c0}-{c0 + n - 1}"


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _fmt(values: np.ndarray) -> str:
    uniq = [float(v) for v in np.unique(np.asarray(values).ravel())]
    text = ", ".join(f"{v:.6g}" for v in uniq[:4])
    return text + (", ..." if len(uniq) > 4 else "")


def _unit_scales(bt, s, codes, G: int, row0: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit (block or sub-block) scale `(rows, cols // unit)` and codes with dead groups zeroed.

    A group whose codes are all zero, or whose scale is 0, never constrains anything. Groups that
    share a unit (G < unit) must have one scale.
    """
    rows, cols = codes.shape
    if not np.isfinite(s).all():
        r, g = _first(~np.isfinite(s))
        raise _Misfit(f"scale {s[r, g]} at row {row0 + r}, group {g} is not finite")
    live = (codes.reshape(rows, -1, G) != 0).any(-1)  # (rows, n_groups)
    s = np.where(live & (s != 0), s, np.float32(0))  # also maps -0.0 to 0
    codes = np.where(np.repeat(s != 0, G, axis=1), codes, 0).astype(np.int16)
    atom = math.gcd(G, bt.sub_block)
    sa = np.repeat(s, G // atom, axis=1).reshape(rows, -1, bt.sub_block // atom)  # (rows, units, a)
    ref = np.take_along_axis(sa, np.abs(sa).argmax(-1)[..., None], -1)[..., 0]
    clash = ((sa != ref[..., None]) & (sa != 0)).any(-1)
    if clash.any():
        r, u = _first(clash)
        raise _Misfit(
            f"groups of {G} columns sharing one {bt.sub_block}-column {bt.name} scale at row "
            f"{row0 + r}, {_cols(u * bt.sub_block, bt.sub_block)} have different scales "
            f"{_fmt(sa[r, u])}"
        )
    return ref, codes


def _orientation(cmin, cmax, rng: tuple[int, int], signs) -> np.ndarray:
    """Per block the first sign in `signs` with `sign * codes` inside `rng`; 0 if none fits."""
    choice = np.zeros(cmin.shape, np.int8)
    for sign in reversed(signs):
        lo, hi = orient_range(cmin, cmax, sign)
        choice = np.where((lo >= rng[0]) & (hi <= rng[1]), sign, choice)
    return choice


def _fit_fp16(bt: BlockType, s_unit, codes, row0: int) -> _Fields:
    rows, nb = s_unit.shape
    bad = ~fp16_exact(s_unit)
    if bad.any():
        r, b = _first(bad)
        raise _Misfit(f"scale {s_unit[r, b]:.9g} at row {row0 + r}, "
                      f"{_cols(b * bt.block_size, bt.block_size)} is not an fp16 value")
    cb = codes.reshape(rows, nb, bt.block_size)
    cmin, cmax = cb.min(-1), cb.max(-1)
    sign = _orientation(cmin, cmax, bt.fit_range, bt.signs)
    if (sign == 0).any():
        r, b = _first(sign == 0)
        raise _Misfit(f"codes {cmin[r, b]}..{cmax[r, b]} at row {row0 + r}, "
                      f"{_cols(b * bt.block_size, bt.block_size)} fit neither orientation of the "
                      f"{bt.name} levels {bt.fit_range[0]}..{bt.fit_range[1]}")
    d = (sign * s_unit).astype(np.float16)
    q = cb * sign[..., None].astype(np.int16) + bt.zero_point  # (rows, nb, block)
    fields = _Fields(q.reshape(-1, bt.block_size), d.reshape(-1))
    if bt.zero_point:  # Q4_1 / Q5_1: m = -8d / -16d must be an fp16 value too
        m32 = np.float32(-bt.zero_point) * d.astype(np.float32)
        if not fp16_exact(m32).all():
            r, b = _first(~fp16_exact(m32))
            raise _Misfit(f"offset m = {m32[r, b]:.9g} at row {row0 + r} overflows fp16")
        fields.dmin = m32.astype(np.float16).reshape(-1)
    return fields


def _super_view(bt: BlockType, s_unit, codes):
    rows = s_unit.shape[0]
    n_sub = QK_K // bt.sub_block
    t = s_unit.reshape(rows, -1, n_sub)  # (rows, n_sb, n_sub)
    return t, codes.reshape(rows, t.shape[1], n_sub, bt.sub_block)  # (rows, n_sb, n_sub, sub)


def _lattice_reason(bt, t, step, k, bound, r: int, b: int, row0: int) -> str:
    where = f"row {row0 + r}, {_cols(b * QK_K, QK_K)}"
    head = f"scales {_fmt(t[r, b])} at {where} are not on the {bt.name} lattice d*k"
    if not np.isfinite(step[r, b]):
        return f"{head}: they share no fp16 step d with integer ratios"
    over = k[r, b][(k[r, b] > bound[r, b]) | (k[r, b] < bt.k_range[0])]
    return (f"{head}: the largest fp16 step d = {step[r, b]:.6g} needs k = {_fmt(over)}, outside "
            f"{bt.k_range[0]}..{int(np.min(bound[r, b]))}")


def _fit_signed_k(bt: BlockType, s_unit, codes, row0: int) -> _Fields:
    """Q3_K, Q6_K: w = d*k*q with signed k; codes stored as they are."""
    lo, hi = bt.code_range
    bad = (codes < lo) | (codes > hi)
    if bad.any():
        r, c = _first(bad)
        raise _Misfit(f"code {codes[r, c]} at row {row0 + r}, column {c} is outside the {bt.name} "
                      f"levels {lo}..{hi}")
    t, cb = _super_view(bt, s_unit, codes)
    step, k = lattice_ratios(t)
    klo, khi = bt.k_range
    sign = np.zeros(step.shape, np.int8)
    for sg in (-1, 1):  # +1 is assigned last and wins
        fits = np.isfinite(step) & ((sg * k >= klo) & (sg * k <= khi)).all(-1)
        sign = np.where(fits, sg, sign)
    if (sign == 0).any():
        r, b = _first(sign == 0)
        raise _Misfit(_lattice_reason(bt, t, step, k, np.full(k.shape, khi), r, b, row0))
    d = (sign * np.nan_to_num(step)).astype(np.float16)
    sc = sign[..., None] * k
    return _Fields(cb.reshape(-1, QK_K), d.reshape(-1), sc=sc.reshape(-1, t.shape[-1]))


def _fit_affine_k(bt: BlockType, s_unit, codes, row0: int) -> _Fields:
    """Q2_K, Q4_K, Q5_K: w = d*k*q - dmin*m with k, m >= 0; a sub-block stores sign(d*s)*c + z."""
    t, cb = _super_view(bt, s_unit, codes)
    cmin, cmax = cb.min(-1), cb.max(-1)  # (rows, n_sb, n_sub)
    sgn = np.sign(t).astype(np.int8)
    step, k = lattice_ratios(np.abs(t))
    qmax, kmax = bt.code_range[1], bt.k_range[1]
    choice = np.zeros(step.shape, np.int8)
    z, Z, bound = np.zeros(k.shape, np.int32), np.zeros(step.shape, np.int32), None
    feasible = np.zeros(step.shape, bool)
    for sg in (-1, 1):  # +1 is assigned last and wins
        plan = plan_affine(*orient_range(cmin, cmax, sg * sgn), qmax, kmax, bt.offsets)
        dmin_ok = fp16_exact(np.maximum(plan.Z, 1) * np.nan_to_num(step))
        fits = np.isfinite(step) & plan.feasible & (k <= plan.bound).all(-1) & dmin_ok
        choice = np.where(fits, sg, choice)
        z, Z = np.where(fits[..., None], plan.z, z), np.where(fits, plan.Z, Z)
        feasible |= plan.feasible
        bound = plan.bound
    if (choice == 0).any():
        r, b = _first(choice == 0)
        if not feasible[r, b]:
            raise _Misfit(f"codes at row {row0 + r}, {_cols(b * QK_K, QK_K)} fit no offset of the "
                          f"{bt.name} levels 0..{qmax}")
        raise _Misfit(_lattice_reason(bt, t, step, k, bound, r, b, row0))
    d32 = choice * np.nan_to_num(step)
    dmin = np.where(Z > 0, Z * d32, d32)
    m_ = np.where(Z[..., None] > 0, k, z * k)
    q = (choice[..., None] * sgn)[..., None] * cb + z[..., None]
    n_sub = t.shape[-1]
    return _Fields(q.reshape(-1, QK_K), d32.astype(np.float16).reshape(-1),
                   dmin.astype(np.float16).reshape(-1), k.reshape(-1, n_sub), m_.reshape(-1, n_sub))


_FITTERS = {"fp16": _fit_fp16, "signed_k": _fit_signed_k, "affine_k": _fit_affine_k}


def _fit(bt: BlockType, scale, codes, G: int, row0: int) -> _Fields:
    s_unit, codes = _unit_scales(bt, scale, codes, G, row0)
    return _FITTERS[bt.family](bt, s_unit, codes, row0)


# --------------------------------------------------------------------------------------------
# Public encoding API.


def _arrays(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    codes = qw.codes.detach().cpu().numpy()
    return codes, qw.scale.detach().float().cpu().numpy()


def _weight(qw: QuantizedWeight) -> np.ndarray:
    return qw.dequantize().detach().cpu().numpy()  # float32 (out, in)


def _row_chunks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _values(scale: np.ndarray, codes: np.ndarray, G: int) -> np.ndarray:
    """s*c in float32, as `QuantizedWeight.dequantize` computes it."""
    return np.repeat(scale, G, axis=1) * codes.astype(np.float32)


def _check_row(bt: BlockType, cols: int) -> None:
    if cols % bt.block_size:
        raise _Misfit(f"row length {cols} is not a multiple of the {bt.name} block size "
                      f"{bt.block_size}")


def _float_problem(bt: BlockType, W: np.ndarray) -> str | None:
    if not np.isfinite(W).all():
        return "the weight has non-finite values"
    if bt.name == "F16":
        bad = ~fp16_exact(W)
    elif bt.name == "BF16":
        bad = (W.view(np.uint32) & 0xFFFF) != 0
    else:
        return None
    if bad.any():
        r, c = _first(bad)
        return f"value {W[r, c]:.9g} at row {r}, column {c} is not a {bt.name} value"
    return None


def _encode_float(bt: BlockType, W: np.ndarray) -> np.ndarray:
    rows = W.shape[0]
    if bt.name == "F32":
        return W.astype("<f4").view(np.uint8).reshape(rows, -1)
    if bt.name == "F16":
        return fp16_nearest(W).astype("<f2").view(np.uint8).reshape(rows, -1)
    bf16 = torch.from_numpy(np.ascontiguousarray(W)).to(torch.bfloat16)  # round to nearest even
    return bf16.view(torch.int16).numpy().view(np.uint8).reshape(rows, -1)


def _problem(bt: BlockType, qw: QuantizedWeight) -> str | None:
    """The first reason `bt` cannot hold `qw` exactly, or None."""
    codes, scale = _arrays(qw)
    if bt.family == "float":
        return _float_problem(bt, _weight(qw))
    try:
        _check_row(bt, codes.shape[1])
        for r0, r1 in _row_chunks(*codes.shape):
            _fit(bt, scale[r0:r1], codes[r0:r1], qw.spec.group_size, r0)
    except _Misfit as err:
        return str(err)
    return None


def _encode_exact(bt: BlockType, qw: QuantizedWeight) -> np.ndarray:
    """Bytes `(out, bytes_per_row)`; raises _Misfit. Each chunk is decoded and compared."""
    codes, scale = _arrays(qw)
    if bt.family == "float":
        W = _weight(qw)
        problem = _float_problem(bt, W)
        if problem:
            raise _Misfit(problem)
        return _encode_float(bt, W)
    rows, cols = codes.shape
    G = qw.spec.group_size
    _check_row(bt, cols)
    out = np.empty((rows, cols // bt.block_size * bt.type_size), np.uint8)
    for r0, r1 in _row_chunks(rows, cols):
        data = _PACK[bt.name](_fit(bt, scale[r0:r1], codes[r0:r1], G, r0)).reshape(r1 - r0, -1)
        if not np.array_equal(_assignment(bt, data, cols).dequantize(),
                              _values(scale[r0:r1], codes[r0:r1], G)):
            raise GSQError(f"internal error: {bt.name} blocks of rows {r0}-{r1 - 1} do not "
                           "decode to s*codes")
        out[r0:r1] = data
    return out


def exact_problem(qtype: str, qw: QuantizedWeight) -> str | None:
    """None if GGUF type `qtype` holds `qw` exactly (decodes to s*codes), else one-line reason."""
    return _problem(block_type(qtype), qw)


def default_type(qw: QuantizedWeight) -> str:
    """The smallest type (bits per weight) that holds `qw` exactly; F32 always does."""
    for name in _DEFAULT_ORDER:
        if _problem(BLOCK_TYPES[name], qw) is None:
            return name
    raise GSQError(f"{tuple(qw.shape)} {qw.spec.label} weight: no GGUF type holds it "
                   "(non-finite values)")


@dataclass(frozen=True)
class EncodingError:
    """How far a (lossy) encoding's decoded weight is from s*codes."""

    rel_rmse: float  # ||W_gguf - W_r|| / ||W_r||
    max_abs: float  # max |W_gguf - W_r|
    changed: float  # fraction of weights whose value changed

    def __str__(self) -> str:
        return (f"relative RMS error {self.rel_rmse:.3g}, max |error| {self.max_abs:.3g}, "
                f"{100 * self.changed:.2f}% of weights changed")


def encoding_error(qtype: str, qw: QuantizedWeight, data: np.ndarray) -> EncodingError:
    """Compare the decoded `data` with `qw.dequantize()`."""
    W = _weight(qw).astype(np.float64)
    diff = decode_weight(qtype, data, W.shape[1]).astype(np.float64) - W
    norm = float(np.linalg.norm(W)) or 1.0
    return EncodingError(float(np.linalg.norm(diff)) / norm, float(np.abs(diff).max(initial=0)),
                         float((diff != 0).mean()))


def encode_weight(qtype: str, qw: QuantizedWeight, *, lossy: bool = False) -> np.ndarray:
    """uint8 `(out, bytes_per_row)` of `qw` as GGUF `qtype`, decoding to s*codes exactly.

    Raises GSQError naming shape, grid, type and reason when the type cannot hold `qw` exactly,
    unless `lossy`: then scales are snapped onto the type (`snap_scales`), codes re-rounded
    against them, and the resulting error is logged (see `encoding_error`). A row length that is
    not a multiple of the block size is refused either way.
    """
    bt = block_type(qtype)
    try:
        return _encode_exact(bt, qw)
    except _Misfit as err:
        problem = str(err)
    rows, cols = qw.shape
    what = f"{rows}x{cols} {qw.spec.label} weight as GGUF {bt.name}"
    if not lossy or cols % bt.block_size or not np.isfinite(_arrays(qw)[1]).all():
        raise GSQError(f"cannot store {what} exactly: {problem}")
    if bt.family == "float":
        data = _encode_float(bt, _weight(qw))
    else:
        try:
            data = _encode_exact(bt, _refit(bt, qw))
        except _Misfit as err:
            raise GSQError(f"internal error: lossy re-fit of {what} not exact: {err}") from err
    logger.warning("lossy %s: %s (%s)", what, encoding_error(bt.name, qw, data), problem)
    return data


# --------------------------------------------------------------------------------------------
# Scale snapping and lossy re-fits.


def _grid(bits: int | str) -> tuple[int, int]:
    spec = QuantSpec(bits, 1)
    return spec.qmin, spec.qmax


def _max_abs_pick(s: np.ndarray, r: int) -> np.ndarray:
    """(rows, n*r) -> (rows, n): per run of r values, the one of largest magnitude."""
    sa = s.reshape(s.shape[0], -1, r)
    return np.take_along_axis(sa, np.abs(sa).argmax(-1)[..., None], -1)[..., 0]


def _to_units(bt: BlockType, s: np.ndarray, G: int):
    """Per-unit scales and the map back to groups; GSQError where no per-group answer exists."""
    unit = bt.sub_block
    if G % unit == 0:
        r = G // unit

        def back(new: np.ndarray) -> np.ndarray:
            runs = new.reshape(new.shape[0], -1, r)
            if not (runs == runs[..., :1]).all():
                raise GSQError(f"groups of {G} columns straddle {bt.name} super-blocks: their "
                               "scales cannot be snapped per group")
            return runs[..., 0]

        return np.repeat(s, r, axis=1), back
    if unit % G == 0:
        r = unit // G
        return _max_abs_pick(s, r), lambda new: np.repeat(new, r, axis=1)
    raise GSQError(f"group size {G} and the {unit}-column {bt.name} scale unit do not nest")


def _snap_fp16(bt: BlockType, s_unit: np.ndarray, bits) -> np.ndarray:
    limit = FP16_MAX / max(bt.zero_point, 1)  # Q4_1 / Q5_1 also store m = -8d / -16d
    return fp16_nearest(np.clip(s_unit, -limit, limit))


def _snap_signed(bt: BlockType, s_unit: np.ndarray, bits) -> np.ndarray:
    t = s_unit.reshape(s_unit.shape[0], -1, QK_K // bt.sub_block)
    fit = snap_lattice(t, *bt.k_range)
    return (fit.step[..., None] * fit.k).reshape(s_unit.shape).astype(np.float32)


def _snap_affine(bt: BlockType, s_unit: np.ndarray, bits) -> np.ndarray:
    """Bounds from the worst case of a `bits` grid: every sub-block may use all its codes."""
    qmin, qmax = _grid(bits if bits is not None else bt.max_bits)
    t = s_unit.reshape(s_unit.shape[0], -1, QK_K // bt.sub_block)
    sgn = np.sign(t).astype(np.int8)
    full_lo, full_hi = np.full(t.shape, qmin), np.full(t.shape, qmax)
    plans = [plan_affine(*orient_range(full_lo, full_hi, sg * sgn), bt.code_range[1],
                         bt.k_range[1], bt.offsets) for sg in (1, -1)]
    score = [np.where(p.feasible, p.bound.min(-1), -1) for p in plans]
    if (np.maximum(*score) < 0).any():
        raise GSQError(f"{bt.name} cannot hold codes {qmin}..{qmax} in every sub-block")
    bound = np.where((score[0] >= score[1])[..., None], plans[0].bound, plans[1].bound)
    fit = snap_lattice(np.abs(t), 0, bound)
    return (sgn * fit.step[..., None] * fit.k).reshape(s_unit.shape).astype(np.float32)


_SNAPPERS = {"fp16": _snap_fp16, "signed_k": _snap_signed, "affine_k": _snap_affine}


def snap_scales(qtype: str, scale: Tensor, group_size: int, *, bits: int | str | None = None
                ) -> Tensor:
    """Project per-group scales `(out, n_groups)` onto what `qtype` stores exactly.

    fp16 block types: nearest fp16. K types: per 256-column super-block an fp16 step d and integer
    k per sub-block (B.6); super-blocks already on the lattice are kept (a projection). Groups
    smaller than the type's scale unit share the largest-magnitude scale of the unit. `bits` is
    the grid of the codes that will use the scales (default: the widest the type holds); it sets
    Q2_K/Q4_K's ranges for k, so that any codes of that grid are then encoded exactly. Returns
    float32 on `scale`'s device; values `d*k` need not be bf16-representable.
    """
    bt = block_type(qtype)
    if bt.family == "float":
        raise GSQError(f"{bt.name} stores plain values, not scales: there is nothing to snap")
    s = scale.detach().float().cpu().numpy()
    if (s.shape[1] * group_size) % bt.block_size:
        raise GSQError(f"row length {s.shape[1] * group_size} is not a multiple of the {bt.name} "
                       f"block size {bt.block_size}")
    if not np.isfinite(s).all():
        raise GSQError("cannot snap non-finite scales")
    s_unit, back = _to_units(bt, s, group_size)
    new = back(_SNAPPERS[bt.family](bt, s_unit, bits))
    return torch.from_numpy(np.ascontiguousarray(new)).to(scale.device)


def _narrower(a: int | str, b: int | str) -> int | str:
    """The grid with fewer levels; our grids nest (ternary in 2-bit in 3-bit in 4-bit)."""
    return a if QuantSpec(a, 1).levels <= QuantSpec(b, 1).levels else b


def _refit(bt: BlockType, qw: QuantizedWeight) -> QuantizedWeight:
    """Snapped scales and codes re-rounded against them, within the grid the type holds.

    A narrower grid widens the scale by the ratio of grid spans (a coarse re-quantization: for
    quality, quantize to the target grid upstream).
    """
    spec = QuantSpec(_narrower(qw.spec.bits, bt.max_bits), qw.spec.group_size)
    span = (qw.spec.qmax - qw.spec.qmin) / (spec.qmax - spec.qmin)
    scale, G = qw.scale.detach().float().cpu() * span, spec.group_size
    nested = G % bt.sub_block == 0 or bt.sub_block % G == 0
    straddles = bt.family != "fp16" and QK_K % G and G % QK_K
    if not nested or straddles:  # re-group at the type's scale unit
        atom = math.gcd(G, bt.sub_block)
        atoms = np.repeat(scale.numpy(), G // atom, axis=1)
        scale = torch.from_numpy(_max_abs_pick(atoms, bt.sub_block // atom))
        G = bt.sub_block
    scale = snap_scales(bt.name, scale, G, bits=spec.bits)
    full = scale.repeat_interleave(G, dim=1)
    W = qw.dequantize().cpu()
    codes = torch.clamp(torch.round(W / torch.where(full != 0, full, 1)), spec.qmin, spec.qmax)
    codes = torch.where(full != 0, codes, 0).to(torch.int8)
    return QuantizedWeight(codes, scale, QuantSpec(spec.bits, G))
