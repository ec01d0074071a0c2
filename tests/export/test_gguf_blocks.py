"""GGUF block encoding (the fitter src/gsq/export/gguf_blocks.py, the codec src/gsq/gguf/) against
the `gguf` package's decoders.

Exactness is checked with `np.array_equal` on float32 values: decoded bytes must equal s*codes
(the sign of a zero is not compared). Q2_0 is not in gguf 0.19.0; it is checked against a scalar
decoder written here from formats.md B.4.
"""

from __future__ import annotations

import dataclasses
import logging

import gguf
import numpy as np
import pytest
import torch

from gsq.errors import GSQError
from gsq.export import gguf_blocks
from gsq.export.gguf_blocks import (
    default_type,
    encode_weight,
    exact_problem,
    snap_scales,
)
from gsq.export.gguf_lattice import max_fp16_step
from gsq.gguf import TYPES as BLOCK_TYPES
from gsq.gguf import decode_assignment, decode_weight, encode_assignment
from gsq.gguf.layouts import BlockFields
from gsq.quant.types import TERNARY, QuantizedWeight, QuantSpec

T = gguf.GGMLQuantizationType
BLOCKED = [name for name, bt in BLOCK_TYPES.items() if bt.family != "float"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
QK_K = 256
# fp16 d / dmin byte ranges inside one block, for random-byte tests
FP16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_0": [0],
    "TQ1_0": [52], "TQ2_0": [64], "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2],
    "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# helpers


def reference_q2_0(data: np.ndarray, in_features: int) -> np.ndarray:
    """Scalar Q2_0 decoder from formats.md B.4: [d fp16 | qs[16]], q = (qs[j//4] >> 2(j%4)) & 3."""
    out = np.zeros((data.shape[0], in_features), np.float32)
    for r in range(data.shape[0]):
        for blk in range(in_features // 64):
            raw = bytes(data[r, 18 * blk : 18 * blk + 18])
            d = np.frombuffer(raw[:2], "<f2")[0].astype(np.float32)
            for j in range(64):
                q = (raw[2 + j // 4] >> (2 * (j % 4))) & 3
                out[r, 64 * blk + j] = d * np.float32(q - 1)
    return out


def reference_decode(qtype: str, data: np.ndarray, in_features: int) -> np.ndarray:
    if qtype == "Q2_0":
        return reference_q2_0(data, in_features)
    return gguf.quants.dequantize(data, T[qtype]).reshape(data.shape[0], in_features)


def assert_exact(qtype: str, qw: QuantizedWeight) -> np.ndarray:
    assert exact_problem(qtype, qw) is None
    data = encode_weight(qtype, qw)
    bt = BLOCK_TYPES[qtype]
    rows, cols = qw.shape
    assert data.dtype == np.uint8
    assert data.shape == (rows, cols // bt.block_size * bt.type_size)
    want = qw.dequantize().numpy()
    assert np.array_equal(reference_decode(qtype, data, cols), want)
    assert np.array_equal(decode_weight(qtype, data, cols), want)
    return data


def make_codes(spec: QuantSpec, rows: int, cols: int, rng, dead: bool = True) -> torch.Tensor:
    """Random codes with both edge codes in every row and (if `dead`) one all-zero group per row."""
    codes = rng.integers(spec.qmin, spec.qmax + 1, (rows, cols))
    codes[:, 0], codes[:, 1] = spec.qmin, spec.qmax
    g = spec.group_size
    for r in range(rows if dead else 0):
        dead = rng.integers(cols // g)
        codes[r, dead * g : (dead + 1) * g] = 0
    return torch.from_numpy(codes.astype(np.int8))


def bf16_scales(shape, rng, negative: bool) -> np.ndarray:
    """Log-uniform 1e-3..1e-1 on the bf16 grid (hence fp16 values); random signs if negative."""
    s = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), shape)).astype(np.float32)
    if negative:
        s *= rng.choice([-1.0, 1.0], shape).astype(np.float32)
    return torch.from_numpy(s).to(torch.bfloat16).float().numpy()


def lattice_scales(qtype: str, bits, G: int, rows: int, cols: int, rng) -> np.ndarray:
    """Scales d*k on the type's lattice, with the signs the type can hold for `bits` codes; the
    first group of each row gets the extreme k."""
    ng = cols // G
    d = np.exp(rng.uniform(np.log(1e-4), np.log(1e-2), (rows, cols // QK_K)))
    d = d.astype(np.float16).astype(np.float32)[:, np.arange(ng) * G // QK_K]  # (rows, ng)
    if qtype in ("Q3_K", "Q6_K"):
        lo, hi = BLOCK_TYPES[qtype].k_range
        k = rng.integers(lo, hi + 1, (rows, ng))
        k[:, 0] = lo
    elif qtype == "Q2_K":  # mixed super-blocks: positive groups k <= 7, mirrored k <= 15
        sign = rng.choice([-1, 1], (rows, ng))
        k = sign * rng.integers(1, np.where(sign > 0, 8, 16), (rows, ng))
        k[:, 0] = -15
    else:  # Q4_K: 4-bit codes need one sign per super-block; smaller grids may mix signs
        k = rng.integers(1, 64, (rows, ng))  # Q5_K: any grid may mix signs (offset 16)
        if bits != 4 or qtype == "Q5_K":
            k *= rng.choice([-1, 1], (rows, ng))
        k[:, 0] = 63
    return (d * k).astype(np.float32)


def qweight(bits, G, scale: np.ndarray, rng, dead: bool = True) -> QuantizedWeight:
    spec = QuantSpec(bits, G)
    codes = make_codes(spec, scale.shape[0], scale.shape[1] * G, rng, dead)
    return QuantizedWeight(codes, torch.from_numpy(np.asarray(scale, np.float32)), spec)


# ---------------------------------------------------------------------------------------------
# layout table


def test_layout_table_matches_gguf():
    for name, bt in BLOCK_TYPES.items():
        if name == "Q2_0":
            assert (bt.type_id, bt.block_size, bt.type_size) == (42, 64, 18)
            assert name not in T.__members__  # else the table should take gguf's facts
        else:
            assert bt.type_id == int(T[name])
            assert (bt.block_size, bt.type_size) == gguf.GGML_QUANT_SIZES[T[name]]
        if bt.family != "float":  # the registered layout has the type's size
            blocks = np.zeros((3, bt.type_size), np.uint8)
            fields = bt.unpack(blocks)
            assert fields.q.shape == (3, bt.block_size)
            assert bt.pack(fields).shape == (3, bt.type_size)


# ---------------------------------------------------------------------------------------------
# random round trips: encode -> gguf decoder == s*codes


FP16_CASES = [  # (type, bits, group sizes, row lengths, negative scales)
    ("Q4_0", 4, (32, 64, 128), (256, 512, 1536), False),
    ("Q4_0", 3, (32, 128), (256, 1536), False),
    ("Q4_0", 2, (32, 64), (256, 576), True),
    ("Q4_0", TERNARY, (32,), (512,), True),
    ("Q4_1", 4, (32, 128), (256, 1536), False),
    ("Q4_1", 2, (64,), (512,), True),
    ("Q5_0", 4, (32, 64, 128), (256, 576, 1536), True),
    ("Q5_0", 3, (32,), (512,), False),
    ("Q5_0", TERNARY, (64,), (576,), True),
    ("Q5_1", 4, (32, 128), (256, 1536), True),
    ("Q5_1", 2, (32,), (576,), True),
    ("Q8_0", 4, (32, 64), (256, 576, 1536), True),
    ("Q8_0", 3, (128,), (512,), False),
    ("Q2_0", 2, (64, 128, 256), (256, 512, 1536), True),
    ("Q2_0", 2, (64,), (576,), True),
    ("Q2_0", TERNARY, (64, 128), (512,), True),
    ("TQ2_0", 2, (256, 512), (512, 1536), True),
    ("TQ2_0", TERNARY, (256,), (256, 512), True),
    ("TQ1_0", TERNARY, (256, 512), (512, 1536), True),
]


@pytest.mark.parametrize("qtype,bits,groups,lengths,negative", FP16_CASES)
def test_fp16_types_exact(qtype, bits, groups, lengths, negative):
    rng = np.random.default_rng(0)
    for G in groups:
        for cols in lengths:
            if cols % G:
                continue
            qw = qweight(bits, G, bf16_scales((4, cols // G), rng, negative), rng)
            assert_exact(qtype, qw)


K_CASES = [  # (type, bits, group sizes)
    ("Q2_K", 2, (16, 32, 64, 128, 256)),
    ("Q2_K", TERNARY, (32, 128)),
    ("Q3_K", 3, (16, 32, 64, 128)),
    ("Q3_K", 2, (32, 256)),
    ("Q4_K", 4, (32, 64, 128, 256)),
    ("Q4_K", 3, (32, 128)),
    ("Q4_K", 2, (32, 64)),
    ("Q5_K", 4, (32, 64, 128, 256)),
    ("Q5_K", 3, (32, 128)),
    ("Q5_K", TERNARY, (64,)),
    ("Q6_K", 4, (16, 32, 128)),
    ("Q6_K", 2, (64, 512)),
]


@pytest.mark.parametrize("qtype,bits,groups", K_CASES)
def test_k_types_exact_with_lattice_scales(qtype, bits, groups):
    rng = np.random.default_rng(1)
    for G in groups:
        for cols in (256, 512, 1536):
            if cols % G:
                continue
            qw = qweight(bits, G, lattice_scales(qtype, bits, G, 4, cols, rng), rng)
            assert_exact(qtype, qw)


def test_q2_k_orientations():
    """All-positive super-blocks allow k up to 15 (dmin = 2d), all-mirrored too (dmin = d);
    mixed ones allow k <= 7 on positive groups only."""
    rng = np.random.default_rng(2)
    d = np.float32(2.0**-9)
    k = np.array([[15, 9, 1, 4], [-15, -9, -1, -4], [-15, 7, -3, 5]], np.float32)
    assert_exact("Q2_K", qweight(2, 64, d * k, rng))
    bad = qweight(2, 64, d * np.array([[-15, 8, -3, 5]], np.float32), rng, dead=False)
    assert "outside 0..7" in exact_problem("Q2_K", bad)


def test_negative_steps_when_needed():
    """Signed types use d < 0 where k would be +32 (Q3_K) or +128 (Q6_K); Q4_K holds 4-bit
    codes with all-negative scales through d < 0."""
    rng = np.random.default_rng(14)
    d = np.float32(2.0**-10)
    assert_exact("Q3_K", qweight(3, 64, d * np.array([[32, 5, -3, 1]], np.float32), rng))
    assert_exact("Q6_K", qweight(4, 128, d * np.array([[128, -77]], np.float32), rng))
    assert_exact("Q4_K", qweight(4, 64, -d * np.array([[63, 5, 1, 17]], np.float32), rng))
    refusal("Q3_K", qweight(3, 64, d * np.array([[32, -32, 1, 1]], np.float32), rng), "outside")


def test_groups_straddling_blocks():
    """Group sizes that do not nest with the block are fine when the blocks' scales agree."""
    rng = np.random.default_rng(15)
    same = np.full((2, 16), 2.0**-6, np.float32)
    assert_exact("Q2_0", qweight(2, 96, same, rng))  # 1536 columns
    assert_exact("Q6_K", qweight(4, 48, np.full((2, 32), 2.0**-6, np.float32), rng))
    varied = qweight(2, 96, bf16_scales((2, 16), rng, True), rng)
    refusal("Q2_0", varied, "different scales")
    assert exact_problem("Q4_0", varied) is None


def test_all_zero_groups_and_zero_scales_never_constrain():
    rng = np.random.default_rng(3)
    spec = QuantSpec(2, 64)
    codes = make_codes(spec, 2, 512, rng)
    codes[:, 64:128] = 0  # all-zero group with an off-everything scale
    scale = np.full((2, 8), 2.0**-7, np.float32)
    scale[:, 1] = 0.1234567  # neither fp16 nor on any lattice: irrelevant, its codes are 0
    scale[:, 2] = 0.0  # zero scale with nonzero codes
    qw = QuantizedWeight(codes, torch.from_numpy(scale), spec)
    for qtype in ("Q2_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                  "Q6_K"):
        assert_exact(qtype, qw)


def test_float_types():
    rng = np.random.default_rng(4)
    qw = qweight(4, 32, bf16_scales((3, 8), rng, False), rng)
    for qtype in ("F32", "F16"):
        assert_exact(qtype, qw)
    assert "not a BF16 value" in exact_problem("BF16", qw)  # 8-bit mantissa * 4-bit code
    scale = np.full((3, 8), 0.5, np.float32)  # s * c on the bf16 grid for |c| <= 8 and 1 bit
    qw = QuantizedWeight(torch.ones(3, 256, dtype=torch.int8), torch.from_numpy(scale), qw.spec)
    assert_exact("BF16", qw)


# ---------------------------------------------------------------------------------------------
# hand-computed single blocks (bytes written out from formats.md B.4)


def one_block(qtype, bits, G, scale, codes) -> np.ndarray:
    spec = QuantSpec(bits, G)
    qw = QuantizedWeight(
        torch.tensor([codes], dtype=torch.int8), torch.tensor([scale], dtype=torch.float32), spec
    )
    return assert_exact(qtype, qw)[0]


def test_hand_block_q4_0():
    codes = [j - 8 for j in range(16)] + [7 - j for j in range(16)]
    qs = [0xF0, 0xE1, 0xD2, 0xC3, 0xB4, 0xA5, 0x96, 0x87,
          0x78, 0x69, 0x5A, 0x4B, 0x3C, 0x2D, 0x1E, 0x0F]  # fmt: skip
    assert list(one_block("Q4_0", 4, 32, [0.5], codes)) == [0x00, 0x38, *qs]


def test_hand_block_q4_1():
    codes = [j - 8 for j in range(16)] + [7 - j for j in range(16)]
    got = one_block("Q4_1", 4, 32, [1.0], codes)
    assert list(got[:4]) == [0x00, 0x3C, 0x00, 0xC8]  # d = 1, m = -8
    assert got[4] == 0xF0 and got[19] == 0x0F


def test_hand_block_q5_0():
    codes = [j - 8 for j in range(16)] + [7 - j for j in range(16)]
    got = one_block("Q5_0", 4, 32, [0.5], codes)
    # d = 0.5, u = c + 16: 8..23 then 23..8; bit 4 of u set for elements 8..23
    assert list(got[:6]) == [0x00, 0x38, 0x00, 0xFF, 0xFF, 0x00]
    assert list(got[6:]) == [0x78, 0x69, 0x5A, 0x4B, 0x3C, 0x2D, 0x1E, 0x0F,
                             0xF0, 0xE1, 0xD2, 0xC3, 0xB4, 0xA5, 0x96, 0x87]  # fmt: skip


def test_hand_block_q5_1():
    codes = [j - 8 for j in range(16)] + [7 - j for j in range(16)]
    got = one_block("Q5_1", 4, 32, [1.0], codes)
    assert list(got[:8]) == [0x00, 0x3C, 0x00, 0xCC, 0x00, 0xFF, 0xFF, 0x00]  # d = 1, m = -16
    assert got[8] == 0x78 and got[23] == 0x87  # q = c + 16, nibbles as Q5_0


def test_hand_block_q8_0():
    got = one_block("Q8_0", 4, 32, [-0.25], [j % 16 - 8 for j in range(32)])
    assert list(got[:2]) == [0x00, 0xB4]  # d = -0.25, q = c
    assert list(got[2:]) == [(j % 16 - 8) & 0xFF for j in range(32)]


def test_hand_block_q2_0():
    got = one_block("Q2_0", 2, 64, [2.0], [-2, -1, 0, 1] * 16)
    # d = -s = -2, stored u = 1 - c = 3, 2, 1, 0 -> 3 | 2<<2 | 1<<4 = 0x1B
    assert list(got) == [0x00, 0xC0] + [0x1B] * 16


def test_hand_block_tq2_0():
    got = one_block("TQ2_0", TERNARY, 256, [-1.0], [1] * 128 + [-1] * 128)
    # d = -s = 1, u = 1 - c: 0 for e < 128, 2 after -> 0b10101010
    assert list(got) == [0x00] * 32 + [0xAA] * 32 + [0x00, 0x3C]


def test_hand_block_tq1_0():
    got = one_block("TQ1_0", TERNARY, 256, [0.5], [1] * 160 + [0] * 80 + [-1] * 16)
    # trit 2 x5: v = 242 -> ceil(242*256/243) = 255; trit 1 x5: v = 121 -> 128; trit 0: 0
    assert list(got) == [0xFF] * 32 + [0x80] * 16 + [0x00] * 4 + [0x00, 0x38]


def test_hand_block_q2_k():
    k = [i % 15 + 1 for i in range(16)]
    codes = [e % 4 - 2 for e in range(256)]
    got = one_block("Q2_K", 2, 16, [0.5 * ki for ki in k], codes)
    # all positive: q = c + 2, d = 0.5, dmin = 2d = 1, sc = m = k
    assert list(got[:16]) == [ki | ki << 4 for ki in k]
    assert list(got[16:80]) == [(b % 4) * 0x55 for b in range(32)] * 2
    assert list(got[80:84]) == [0x00, 0x38, 0x00, 0x3C]


def test_hand_block_q3_k():
    k = list(range(-8, 0)) + list(range(1, 9))
    codes = [e % 8 - 4 for e in range(256)]
    got = one_block("Q3_K", 3, 16, [0.25 * ki for ki in k], codes)
    assert list(got[:32]) == [0xFF if b % 8 >= 4 else 0 for b in range(32)]  # hmask: u >> 2
    assert list(got[32:96]) == [(b % 4) * 0x55 for b in range(32)] * 2  # low bits of u = c + 4
    assert list(got[96:104]) == [(8 + i) | (1 + i) << 4 for i in range(8)]  # L = k + 32, low
    assert list(got[104:108]) == [0xA5] * 4  # high bits: 1,1,2,2 at bits 0,2,4,6
    assert list(got[108:110]) == [0x00, 0x34]  # d = 0.25


def test_hand_block_q4_k():
    k = [1, 2, 3, 4, 5, 6, 7, 63]
    codes = [e % 16 - 8 for e in range(256)]
    got = one_block("Q4_K", 4, 32, [ki / 16 for ki in k], codes)
    assert list(got[:4]) == [0x00, 0x2C, 0x00, 0x38]  # d = 1/16, dmin = 8d = 0.5
    assert list(got[4:16]) == [1, 2, 3, 0xC4, 1, 2, 3, 0xC4, 0x55, 0x66, 0x77, 0xFF]
    assert list(got[16:]) == [(b % 16) * 17 for b in range(32)] * 4


def test_hand_block_q5_k():
    k = [1, 2, 3, 4, 5, 6, 7, 63]
    codes = [e % 16 - 8 for e in range(256)]
    got = one_block("Q5_K", 4, 32, [ki / 16 for ki in k], codes)
    assert list(got[:4]) == [0x00, 0x2C, 0x00, 0x3C]  # d = 1/16, dmin = 16d = 1
    assert list(got[4:16]) == [1, 2, 3, 0xC4, 1, 2, 3, 0xC4, 0x55, 0x66, 0x77, 0xFF]
    # q = c + 16 = b % 16 + 8 in every sub-block: bit 4 set in all 8 sub-blocks for b % 16 >= 8
    assert list(got[16:48]) == [0xFF if b % 16 >= 8 else 0 for b in range(32)]
    assert list(got[48:]) == [((b + 8) % 16) * 17 for b in range(32)] * 4


def test_hand_block_q6_k():
    k = [-128, 127, -1] + list(range(1, 14))
    codes = [e % 16 - 8 for e in range(256)]
    got = one_block("Q6_K", 4, 16, [ki / 256 for ki in k], codes)
    assert list(got[:128]) == [((b + 8) % 16) * 17 for b in range(64)] * 2
    assert list(got[128:192]) == [0x55 if b % 16 < 8 else 0xAA for b in range(32)] * 2
    assert list(got[192:208]) == [0x80, 0x7F, 0xFF] + list(range(1, 14))
    assert list(got[208:]) == [0x00, 0x1C]  # d = 2^-8


def test_tq1_0_all_243_byte_codes():
    """Row v puts the 5 base-3 digits of v on the elements of qs[0] (and 4 digits on qh[0])."""
    v = np.arange(243)
    digits = np.stack([(v // 3 ** (4 - k)) % 3 for k in range(5)], 1)  # (243, 5), trit t_k
    codes = np.zeros((243, 256), np.int8)
    codes[:, [0, 32, 64, 96, 128]] = digits - 1
    codes[:81, [240, 244, 248, 252]] = digits[:81, 1:] - 1  # qh[0]: 4 trits (v < 81)
    qw = QuantizedWeight(torch.from_numpy(codes), torch.ones(243, 1), QuantSpec(TERNARY, 256))
    data = assert_exact("TQ1_0", qw)
    assert np.array_equal(data[:, 0], (v * 256 + 242) // 243)
    qh_v = (digits[:81, 1:] * [81, 27, 9, 3]).sum(1)
    assert np.array_equal(data[:81, 48], (qh_v * 256 + 242) // 243)


# ---------------------------------------------------------------------------------------------
# refusals: exact_problem's reasons and encode_weight's GSQError


def refusal(qtype: str, qw: QuantizedWeight, words: str) -> None:
    problem = exact_problem(qtype, qw)
    assert problem is not None and words in problem, problem
    with pytest.raises(GSQError) as err:
        encode_weight(qtype, qw)
    rows, cols = qw.shape
    assert f"{rows}x{cols}" in str(err.value) and qtype in str(err.value)
    assert words in str(err.value)


def test_refusals():
    rng = np.random.default_rng(5)
    qw_g32 = qweight(2, 32, bf16_scales((2, 16), rng, True), rng)
    refusal("Q2_0", qw_g32, "different scales")  # one d per 64 columns
    refusal("TQ2_0", qw_g32, "different scales")
    qw_g16 = qweight(4, 16, lattice_scales("Q6_K", 4, 16, 2, 512, rng), rng)
    refusal("Q4_K", qw_g16, "different scales")  # Q4_K sub-blocks are 32 columns
    qw_576 = qweight(2, 64, bf16_scales((2, 9), rng, True), rng)
    for qtype in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0"):
        refusal(qtype, qw_576, "not a multiple of the")
    qw_bf16 = qweight(2, 64, bf16_scales((2, 8), rng, True), rng)
    for qtype in K_TYPES:
        refusal(qtype, qw_bf16, "not on the")
    refusal("Q4_0", qweight(4, 32, np.full((2, 16), 0.1, np.float32), rng), "not an fp16 value")
    tiny = np.full((2, 16), 2.0**-20 * (1 + 1 / 128), np.float32)  # bf16; below fp16 precision
    refusal("Q8_0", qweight(4, 32, tiny, rng), "not an fp16 value")
    qw4 = qweight(4, 64, np.full((2, 8), 0.5, np.float32), rng)
    for qtype in ("Q2_0", "TQ2_0"):
        refusal(qtype, qw4, "fit neither orientation")
    refusal("Q2_K", qw4, "fit no offset")
    refusal("Q3_K", qw4, "outside the Q3_K levels")
    refusal("TQ1_0", qweight(2, 256, np.full((2, 2), 0.5, np.float32), rng), "fit neither")
    refusal("F16", qweight(4, 32, np.full((2, 16), 1e-7, np.float32), rng), "not a F16 value")


def test_unknown_type_and_bad_data():
    rng = np.random.default_rng(6)
    qw = qweight(4, 32, np.full((2, 2), 0.5, np.float32), rng)
    with pytest.raises(GSQError, match="unknown GGUF type"):
        encode_weight("IQ2_XS", qw)
    with pytest.raises(GSQError, match="must be uint8"):
        decode_weight("Q4_0", np.zeros((2, 35), np.uint8), 64)


# ---------------------------------------------------------------------------------------------
# lossy re-fits and snapping


def test_lossy(caplog):
    rng = np.random.default_rng(7)
    qw = qweight(4, 64, bf16_scales((8, 8), rng, False), rng)
    assert exact_problem("Q4_K", qw) is not None
    with caplog.at_level(logging.WARNING, logger="gsq.export.gguf_blocks"):
        data = encode_weight("Q4_K", qw, lossy=True)
    assert "lossy" in caplog.text and "relative RMS error" in caplog.text
    err = gguf_blocks.encoding_error("Q4_K", qw, data)
    assert 0 < err.rel_rmse < 0.05
    for qtype, bits, G in (("Q2_0", 2, 32), ("Q3_K", 4, 64), ("TQ1_0", 2, 256), ("BF16", 4, 64)):
        qw = qweight(bits, G, bf16_scales((4, 512 // G), rng, True), rng)
        data = encode_weight(qtype, qw, lossy=True)
        assert gguf_blocks.encoding_error(qtype, qw, data).rel_rmse < 0.5
    exact = qweight(2, 64, bf16_scales((2, 8), rng, True), rng)
    assert np.array_equal(encode_weight("Q2_0", exact, lossy=True), encode_weight("Q2_0", exact))
    with pytest.raises(GSQError, match="not a multiple"):
        encode_weight("Q2_K", qweight(2, 64, bf16_scales((2, 9), rng, True), rng), lossy=True)


SNAP_CASES = [("Q4_0", 4, 32), ("Q4_1", 4, 64), ("Q8_0", 3, 128), ("Q2_0", 2, 64),
              ("Q2_0", 2, 32), ("TQ1_0", TERNARY, 64), ("TQ2_0", 2, 256), ("Q2_K", 2, 32),
              ("Q2_K", TERNARY, 128), ("Q3_K", 3, 32), ("Q3_K", 2, 16), ("Q4_K", 4, 128),
              ("Q4_K", 2, 32), ("Q4_K", 4, 16), ("Q6_K", 4, 64), ("Q6_K", 2, 512),
              ("Q5_0", 4, 32), ("Q5_1", 3, 64), ("Q5_K", 4, 32), ("Q5_K", 2, 128)]  # fmt: skip


@pytest.mark.parametrize("qtype,bits,G", SNAP_CASES)
def test_snap_scales_are_encoded_exactly(qtype, bits, G):
    rng = np.random.default_rng(8)
    cols = 1536 if G != 512 else 1024
    raw = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), (4, cols // G))).astype(np.float32)
    negative = bits == 2 or bits == TERNARY or qtype in ("Q3_K", "Q5_0", "Q5_K", "Q6_K")
    if negative:
        raw *= rng.choice([-1.0, 1.0], raw.shape).astype(np.float32)
    snapped = snap_scales(qtype, torch.from_numpy(raw), G, bits=bits)
    assert snapped.dtype == torch.float32 and snapped.shape == raw.shape
    assert torch.equal(snap_scales(qtype, snapped, G, bits=bits), snapped)  # a projection
    unit = BLOCK_TYPES[qtype].sub_block
    if G % unit == 0:  # (smaller groups share the unit's largest-magnitude scale, sign included)
        assert np.all(np.sign(snapped.numpy()) * np.sign(raw) >= 0)
    qw = QuantizedWeight(make_codes(QuantSpec(bits, G), 4, cols, rng), snapped, QuantSpec(bits, G))
    assert_exact(qtype, qw)
    if BLOCK_TYPES[qtype].family == "fp16" and G % BLOCK_TYPES[qtype].block_size == 0:
        assert np.allclose(snapped.numpy(), raw, rtol=2**-11, atol=0)


def test_snap_scales_refusals():
    s = torch.ones(2, 4)
    with pytest.raises(GSQError, match="nothing to snap"):
        snap_scales("F16", s, 64)
    with pytest.raises(GSQError, match="do not nest"):
        snap_scales("Q2_0", torch.ones(2, 8), 96)
    with pytest.raises(GSQError, match="not a multiple"):
        snap_scales("Q4_K", torch.ones(2, 9), 64)


def test_max_fp16_step_is_the_largest():
    t = np.array([[3 * 2.0**-10, 5 * 2.0**-12, 0.0], [0.0, 0.0, 0.0], [1.0, 1 / 3, 1.0]],
                 np.float32)  # fmt: skip
    step = max_fp16_step(t)
    assert step[0] == 2.0**-12 and step[1] == 0 and np.isnan(step[2])
    assert max_fp16_step(np.array([[2047.0 * 7 * 2**-20, 2047.0 * 2**-20]], np.float32))[0] == (
        np.float32(2047.0 * 2**-20)
    )


# ---------------------------------------------------------------------------------------------
# decode_assignment: the codes and affine maps a file stores


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    assert a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0"])
def test_decode_assignment_on_gguf_quantized_blocks(qtype):
    rng = np.random.default_rng(9)
    W = rng.normal(size=(6, 512)).astype(np.float32)
    data = gguf.quants.quantize(W, T[qtype])
    a = decode_assignment(qtype, data, 512)
    assert_same_bits(a.dequantize(), gguf.quants.dequantize(data, T[qtype]))
    lo, hi = a.code_range
    assert a.codes.min() >= lo and a.codes.max() <= hi
    assert np.array_equal(encode_assignment(a), data) or qtype == "TQ1_0"


def random_blocks(qtype: str, rows: int, in_features: int, rng) -> np.ndarray:
    """Random bytes with every fp16 d/dmin finite (normal or subnormal, random sign)."""
    bt = BLOCK_TYPES[qtype]
    n_blocks = in_features // bt.block_size
    data = rng.integers(0, 256, (rows, n_blocks, bt.type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        half = rng.integers(0, 1 << 16, (rows, n_blocks)).astype(np.uint16)
        half = np.where((half & 0x7C00) == 0x7C00, half & ~np.uint16(0x4000), half)  # no inf/nan
        data[:, :, off : off + 2] = half.astype("<u2")[..., None].view(np.uint8)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", BLOCKED)
def test_decode_assignment_on_random_bytes(qtype):
    rng = np.random.default_rng(10)
    cols = 512
    data = random_blocks(qtype, 8, cols, rng)
    a = decode_assignment(qtype, data, cols)
    assert_same_bits(a.dequantize(), reference_decode(qtype, data, cols))
    assert a.scale.shape == a.min.shape == (8, cols // a.sub_block)
    scale, low = np.repeat(a.scale, a.sub_block, 1), np.repeat(a.min, a.sub_block, 1)
    assert np.array_equal(a.dequantize(), scale * a.codes - low)
    again = encode_assignment(a)
    if qtype == "TQ1_0":
        assert_same_bits(decode_weight(qtype, again, cols), a.dequantize())
    else:
        assert np.array_equal(again, data)


def test_decode_assignment_of_our_encoding_gives_our_codes():
    rng = np.random.default_rng(11)
    qw = qweight(3, 32, lattice_scales("Q3_K", 3, 32, 2, 512, rng), rng)
    a = decode_assignment("Q3_K", encode_weight("Q3_K", qw), 512)
    live = (qw.codes.numpy().reshape(2, 16, 32) != 0).any(-1) & (qw.scale.numpy() != 0)
    live = np.repeat(live, 32, axis=1)  # (2, 512): weights whose code the file must keep
    assert np.array_equal(a.codes[live], qw.codes.numpy()[live])
    assert np.array_equal(np.repeat(a.scale, 16, 1)[live], np.repeat(qw.scale.numpy(), 32, 1)[live])


# ---------------------------------------------------------------------------------------------
# default_type and negative controls


def test_default_type():
    rng = np.random.default_rng(12)
    assert default_type(qweight(4, 32, bf16_scales((2, 18), rng, False), rng)) == "Q4_0"
    assert default_type(qweight(2, 64, bf16_scales((2, 9), rng, True), rng)) == "Q2_0"
    assert default_type(qweight(3, 64, bf16_scales((2, 9), rng, False), rng)) == "Q4_0"
    assert default_type(qweight(TERNARY, 256, bf16_scales((2, 2), rng, True), rng)) == "TQ1_0"
    assert default_type(qweight(2, 256, bf16_scales((2, 2), rng, True), rng)) == "TQ2_0"
    assert default_type(qweight(2, 32, bf16_scales((2, 16), rng, True), rng)) == "Q4_0"
    q2k = qweight(2, 32, lattice_scales("Q2_K", 2, 32, 2, 512, rng), rng)
    assert default_type(q2k) == "Q2_K"
    q3k = qweight(3, 32, lattice_scales("Q3_K", 3, 32, 2, 512, rng), rng)
    assert default_type(q3k) == "Q3_K"
    # 4-bit codes over both signs on a lattice d*k that is not fp16 (d = 1025 * 2^-20, odd
    # k >= 9): Q4_0/Q5_0 need fp16 scales, Q4_K one sign per super-block or k <= 7
    k = rng.integers(4, 32, (2, 16)) * 2 + 1
    k *= np.where(np.arange(16) % 2, -1, 1)
    q5k = qweight(4, 32, (k * np.float32(1025 * 2.0**-20)).astype(np.float32), rng, dead=False)
    q5k.codes.view(2, 16, 32)[:, :, :2] = torch.tensor([-8, 7], dtype=torch.int8)
    assert default_type(q5k) == "Q5_K"
    fp32 = qweight(4, 32, np.full((2, 16), 0.1, np.float32), rng)  # not fp16: only floats
    assert default_type(fp32) == "F32"


def test_negative_control_corrupted_layouts_are_caught(monkeypatch):
    rng = np.random.default_rng(13)
    qw = qweight(4, 32, bf16_scales((2, 16), rng, False), rng)
    data = encode_weight("Q4_0", qw)
    # adjacent-pair nibbles (the layout formats.md warns against) decode to something else
    blocks = data.reshape(-1, 18)
    nib = np.concatenate([blocks[:, 2:] & 15, blocks[:, 2:] >> 4], axis=1)  # element order
    pairs = (nib[:, 0::2] | nib[:, 1::2] << 4).astype(np.uint8)
    wrong = np.concatenate([blocks[:, :2], pairs], axis=1).reshape(data.shape)
    assert not np.array_equal(decode_weight("Q4_0", wrong, 512), qw.dequantize().numpy())
    # a single flipped bit in a Q4_K scale byte is visible
    qk = qweight(4, 32, lattice_scales("Q4_K", 4, 32, 2, 512, rng), rng)
    data = encode_weight("Q4_K", qk).copy()
    data[0, 4] ^= 1
    assert not np.array_equal(decode_weight("Q4_K", data, 512), qk.dequantize().numpy())
    # encode_weight decodes what it packed: a broken packer (d and dmin swapped) is refused
    good = BLOCK_TYPES["Q4_K"].pack

    def swapped(f):
        return good(BlockFields(f.q, f.dmin, f.d, f.sc, f.m))

    monkeypatch.setitem(BLOCK_TYPES, "Q4_K", dataclasses.replace(BLOCK_TYPES["Q4_K"],
                                                                 pack=swapped))
    qk2 = qweight(2, 32, lattice_scales("Q4_K", 2, 32, 2, 512, rng), rng)
    with pytest.raises(GSQError, match="internal error"):
        encode_weight("Q4_K", qk2)
