"""Byte layouts of the GGUF block types: fields of N blocks <-> their bytes (formats.md B.4).

Pure numpy. `BlockFields` holds a type's stored fields for N blocks in the decoder's integer terms;
`pack_<type>` writes them as `(N, type_size)` uint8 and `unpack_<type>` reads them back. Layouts
(offsets in bytes, little-endian; `e` = element in block, `n = e//128`, `r = e%128`):

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

Also the fp16 facts every block scale obeys (`fp16_exact`, `fp16_nearest`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP16_MAX = 65504.0
_SHIFT2 = np.array([0, 2, 4, 6], dtype=np.uint8)
_SHIFT4 = np.array([0, 4], dtype=np.uint8)


def fp16_exact(x: np.ndarray) -> np.ndarray:
    """Boolean mask: `x` (float32) is finite and exactly an IEEE half."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.isfinite(x) & (x.astype(np.float16).astype(np.float32) == x)


def fp16_nearest(x: np.ndarray) -> np.ndarray:
    """Nearest fp16 value (as float32), saturating at +-65504 instead of overflowing."""
    x = np.clip(np.asarray(x, dtype=np.float32), -FP16_MAX, FP16_MAX)
    return x.astype(np.float16).astype(np.float32)


@dataclass
class BlockFields:
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


def pack_q4_0(f: BlockFields) -> np.ndarray:
    nib = (f.q + 8).astype(np.uint8)  # (N, 32)
    return np.concatenate([_f16_bytes(f.d), nib[:, :16] | nib[:, 16:] << 4], axis=1)


def unpack_q4_0(b: np.ndarray) -> BlockFields:
    qs = b[:, 2:18]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int16) - 8
    return BlockFields(q, _f16_read(b[:, :2]))


def pack_q4_1(f: BlockFields) -> np.ndarray:
    nib = f.q.astype(np.uint8)
    qs = nib[:, :16] | nib[:, 16:] << 4
    return np.concatenate([_f16_bytes(f.d), _f16_bytes(f.dmin), qs], axis=1)


def unpack_q4_1(b: np.ndarray) -> BlockFields:
    qs = b[:, 4:20]
    q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int16)
    m_ = -np.ones((b.shape[0], 1), np.int16)  # value = d*q - (m * -1)
    return BlockFields(q, _f16_read(b[:, :2]), _f16_read(b[:, 2:4]), m=m_)


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


def pack_q5_0(f: BlockFields) -> np.ndarray:
    u = (f.q + 16).astype(np.uint8)  # (N, 32), 0..31
    return np.concatenate([_f16_bytes(f.d), _fifth_bits_32(u), _nibbles_32(u)], axis=1)


def unpack_q5_0(b: np.ndarray) -> BlockFields:
    return BlockFields(_unpack_5bit_32(b[:, 2:6], b[:, 6:22]) - 16, _f16_read(b[:, :2]))


def pack_q5_1(f: BlockFields) -> np.ndarray:
    u = f.q.astype(np.uint8)
    return np.concatenate([_f16_bytes(f.d), _f16_bytes(f.dmin), _fifth_bits_32(u),
                           _nibbles_32(u)], axis=1)


def unpack_q5_1(b: np.ndarray) -> BlockFields:
    m_ = -np.ones((b.shape[0], 1), np.int16)  # value = d*q - (m * -1), as Q4_1
    return BlockFields(_unpack_5bit_32(b[:, 4:8], b[:, 8:24]), _f16_read(b[:, :2]),
                   _f16_read(b[:, 2:4]), m=m_)


def pack_q8_0(f: BlockFields) -> np.ndarray:
    return np.concatenate([_f16_bytes(f.d), f.q.astype(np.int8).view(np.uint8)], axis=1)


def unpack_q8_0(b: np.ndarray) -> BlockFields:
    return BlockFields(b[:, 2:34].view(np.int8).astype(np.int16), _f16_read(b[:, :2]))


def pack_q2_0(f: BlockFields) -> np.ndarray:
    u = (f.q + 1).astype(np.uint8).reshape(-1, 16, 4)  # element 4i + j in byte i, bits 2j
    return np.concatenate([_f16_bytes(f.d), np.bitwise_or.reduce(u << _SHIFT2, axis=2)], axis=1)


def unpack_q2_0(b: np.ndarray) -> BlockFields:
    q = ((b[:, 2:18, None] >> _SHIFT2) & 3).reshape(-1, 64).astype(np.int16) - 1
    return BlockFields(q, _f16_read(b[:, :2]))


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


def pack_tq1_0(f: BlockFields) -> np.ndarray:
    t = (f.q + 1).astype(np.uint8)  # (N, 256) trits
    qs0 = _trit_bytes(t[:, :160].reshape(-1, 5, 32))  # element 32k + b in byte b
    qs1 = _trit_bytes(t[:, 160:240].reshape(-1, 5, 16))  # element 160 + 16k + b
    qh = _trit_bytes(t[:, 240:].reshape(-1, 4, 4))  # element 240 + 4k + b
    return np.concatenate([qs0, qs1, qh, _f16_bytes(f.d)], axis=1)


def unpack_tq1_0(b: np.ndarray) -> BlockFields:
    t = np.concatenate(
        [_byte_trits(b[:, :32], 5), _byte_trits(b[:, 32:48], 5), _byte_trits(b[:, 48:52], 4)],
        axis=1,
    )
    return BlockFields(t.astype(np.int16) - 1, _f16_read(b[:, 52:54]))


def pack_tq2_0(f: BlockFields) -> np.ndarray:
    return np.concatenate([_pack_crumbs_k(f.q + 1), _f16_bytes(f.d)], axis=1)


def unpack_tq2_0(b: np.ndarray) -> BlockFields:
    return BlockFields(_unpack_crumbs_k(b[:, :64]).astype(np.int16) - 1, _f16_read(b[:, 64:66]))


def pack_q2_k(f: BlockFields) -> np.ndarray:
    scales = (f.sc | f.m << 4).astype(np.uint8)  # (N, 16)
    return np.concatenate(
        [scales, _pack_crumbs_k(f.q), _f16_bytes(f.d), _f16_bytes(f.dmin)], axis=1
    )


def unpack_q2_k(b: np.ndarray) -> BlockFields:
    q = _unpack_crumbs_k(b[:, 16:80]).astype(np.int16)
    d, dmin = _f16_read(b[:, 80:82]), _f16_read(b[:, 82:84])
    return BlockFields(q, d, dmin, sc=b[:, :16] & 15, m=b[:, :16] >> 4)


def pack_q3_k(f: BlockFields) -> np.ndarray:
    u = (f.q + 4).astype(np.uint8)  # (N, 256), 0..7
    h = (u >> 2).reshape(-1, 8, 32)  # element 32j + b: bit j of hmask[b]
    hmask = np.bitwise_or.reduce(h << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    L = (f.sc + 32).astype(np.uint8)  # (N, 16) six-bit
    low = (L[:, :8] & 15) | (L[:, 8:] & 15) << 4
    high = np.bitwise_or.reduce((L >> 4).reshape(-1, 4, 4) << _SHIFT2[:, None], axis=1)
    return np.concatenate([hmask, _pack_crumbs_k(u & 3), low, high, _f16_bytes(f.d)], axis=1)


def unpack_q3_k(b: np.ndarray) -> BlockFields:
    n = b.shape[0]
    h = ((b[:, None, :32] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(n, 256)
    q = _unpack_crumbs_k(b[:, 32:96]).astype(np.int16) - 4 * (1 - h.astype(np.int16))
    sb = b[:, 96:108]
    low = np.concatenate([sb[:, :8] & 15, sb[:, :8] >> 4], axis=1)  # (N, 16)
    high = ((sb[:, None, 8:12] >> _SHIFT2[:, None]) & 3).reshape(n, 16)
    sc = (low | high << 4).astype(np.int16) - 32
    return BlockFields(q, _f16_read(b[:, 108:110]), sc=sc)


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


def pack_q4_k(f: BlockFields) -> np.ndarray:
    return np.concatenate([_f16_bytes(f.d), _f16_bytes(f.dmin), _pack_k_scales(f.sc, f.m),
                           _pack_nibbles_k(f.q)], axis=1)


def unpack_q4_k(b: np.ndarray) -> BlockFields:
    sc, m_ = _unpack_k_scales(b[:, 4:16])
    q = _unpack_nibbles_k(b[:, 16:144])
    return BlockFields(q.astype(np.int16), _f16_read(b[:, :2]), _f16_read(b[:, 2:4]), sc, m_)


def pack_q5_k(f: BlockFields) -> np.ndarray:
    u = f.q.astype(np.uint8)  # (N, 256), 0..31
    h = (u >> 4).reshape(-1, 8, 32)  # element 32j + b: bit j of qh[b]
    qh = np.bitwise_or.reduce(h << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    return np.concatenate([_f16_bytes(f.d), _f16_bytes(f.dmin), _pack_k_scales(f.sc, f.m), qh,
                           _pack_nibbles_k(u)], axis=1)


def unpack_q5_k(b: np.ndarray) -> BlockFields:
    n = b.shape[0]
    sc, m_ = _unpack_k_scales(b[:, 4:16])
    h = ((b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(n, 256)
    q = (_unpack_nibbles_k(b[:, 48:176]) | h << 4).astype(np.int16)
    return BlockFields(q, _f16_read(b[:, :2]), _f16_read(b[:, 2:4]), sc, m_)


def pack_q6_k(f: BlockFields) -> np.ndarray:
    u = (f.q + 32).astype(np.uint8)  # (N, 256), 0..63
    low = (u & 15).reshape(-1, 2, 2, 64)  # element 128n + 64h + b: ql[64n + b], nibble h
    ql = (low[:, :, 0] | low[:, :, 1] << 4).reshape(-1, 128)
    high = (u >> 4).reshape(-1, 2, 4, 32)  # element 128n + 32j + b: qh[32n + b], bits 2j
    qh = np.bitwise_or.reduce(high << _SHIFT2[:, None], axis=2).reshape(-1, 64)
    scales = f.sc.astype(np.int8).view(np.uint8)
    return np.concatenate([ql, qh, scales, _f16_bytes(f.d)], axis=1)


def unpack_q6_k(b: np.ndarray) -> BlockFields:
    n = b.shape[0]
    low = ((b[:, :128].reshape(n, 2, 1, 64) >> _SHIFT4[:, None]) & 15).reshape(n, 256)
    high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> _SHIFT2[:, None]) & 3).reshape(n, 256)
    q = (low | high << 4).astype(np.int16) - 32
    return BlockFields(q, _f16_read(b[:, 208:210]), sc=b[:, 192:208].view(np.int8).astype(np.int16))


