"""Fitting gsq quantized weights onto GGUF block types, exact by construction (formats.md
B.4-B.6).

`encode_weight` turns a `QuantizedWeight` (codes `c`, per-group scales `s`) into the bytes of one
GGUF tensor, `(out, bytes_per_row)` uint8, whose dequantization equals `s*c` in float32 (values
compared with ==; the sign of a zero is not preserved). Blocks are built from our codes and scales,
never by the `gguf` package's quantizers (they re-round). The types, their byte layouts and
decoders are `gsq.gguf`'s (one table, `gsq.gguf.TYPES`); this module finds the fields that hold
a weight.

Which of our grids a type holds exactly (B.5): fp16-block types need `s` fp16-representable and
one `|s|` per block (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 any grid; Q2_0/TQ2_0 2-bit either sign and
ternary; TQ1_0 ternary); K types need each super-block's sub-block scales on a lattice `{d*k}`
(`gguf_lattice.py`; Q5_K's 32 levels hold 4-bit codes of either sign through the offset 16).
Everything here is data-driven: an all-zero group never constrains its scale, and codes only need
to fit the type where they actually occur.

API: `encode_weight`, `exact_problem`, `default_type` (smallest exact type by bits per weight:
TQ1_0 < TQ2_0 < Q2_0 < Q2_K < Q3_K < Q4_0 < Q4_K < Q5_0 < Q5_K < Q5_1 < Q6_K < Q8_0 < F16 <
BF16 < F32), `snap_scales` (project scales onto a type) and `encoding_error`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gsq.errors import GSQError
from gsq.export.gguf_lattice import lattice_ratios, orient_range, plan_affine, snap_lattice
from gsq.gguf import QK_K, TYPES, GGUFType, decode_assignment, decode_weight, gguf_type
from gsq.gguf.layouts import FP16_MAX, BlockFields, fp16_exact, fp16_nearest
from gsq.quant.types import QuantizedWeight, QuantSpec

__all__ = [
    "EncodingError",
    "default_type",
    "encode_weight",
    "encoding_error",
    "exact_problem",
    "snap_scales",
]

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 20  # rows are fitted in chunks of about this many weights
# default_type tries these in order: by bits per weight, fp16-scale types before K types on ties
_DEFAULT_ORDER = ("TQ1_0", "TQ2_0", "Q2_0", "Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q5_0", "Q5_K",
                  "Q5_1", "Q6_K", "Q8_0", "F16", "BF16", "F32")


class _Misfit(Exception):
    """One-line reason a block type cannot hold a weight exactly."""


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


def _fit_fp16(bt: GGUFType, s_unit, codes, row0: int) -> BlockFields:
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
    fields = BlockFields(q.reshape(-1, bt.block_size), d.reshape(-1))
    if bt.zero_point:  # Q4_1 / Q5_1: m = -8d / -16d must be an fp16 value too
        m32 = np.float32(-bt.zero_point) * d.astype(np.float32)
        if not fp16_exact(m32).all():
            r, b = _first(~fp16_exact(m32))
            raise _Misfit(f"offset m = {m32[r, b]:.9g} at row {row0 + r} overflows fp16")
        fields.dmin = m32.astype(np.float16).reshape(-1)
    return fields


def _super_view(bt: GGUFType, s_unit, codes):
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


def _fit_signed_k(bt: GGUFType, s_unit, codes, row0: int) -> BlockFields:
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
    return BlockFields(cb.reshape(-1, QK_K), d.reshape(-1), sc=sc.reshape(-1, t.shape[-1]))


def _fit_affine_k(bt: GGUFType, s_unit, codes, row0: int) -> BlockFields:
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
    return BlockFields(q.reshape(-1, QK_K), d32.astype(np.float16).reshape(-1),
                   dmin.astype(np.float16).reshape(-1), k.reshape(-1, n_sub), m_.reshape(-1, n_sub))


_FITTERS = {"fp16": _fit_fp16, "signed_k": _fit_signed_k, "affine_k": _fit_affine_k}


def _fit(bt: GGUFType, scale, codes, G: int, row0: int) -> BlockFields:
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


def _check_row(bt: GGUFType, cols: int) -> None:
    if cols % bt.block_size:
        raise _Misfit(f"row length {cols} is not a multiple of the {bt.name} block size "
                      f"{bt.block_size}")


def _float_problem(bt: GGUFType, W: np.ndarray) -> str | None:
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


def _encode_float(bt: GGUFType, W: np.ndarray) -> np.ndarray:
    rows = W.shape[0]
    if bt.name == "F32":
        return W.astype("<f4").view(np.uint8).reshape(rows, -1)
    if bt.name == "F16":
        return fp16_nearest(W).astype("<f2").view(np.uint8).reshape(rows, -1)
    bf16 = torch.from_numpy(np.ascontiguousarray(W)).to(torch.bfloat16)  # round to nearest even
    return bf16.view(torch.int16).numpy().view(np.uint8).reshape(rows, -1)


def _problem(bt: GGUFType, qw: QuantizedWeight) -> str | None:
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


def _encode_exact(bt: GGUFType, qw: QuantizedWeight) -> np.ndarray:
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
        data = bt.pack(_fit(bt, scale[r0:r1], codes[r0:r1], G, r0)).reshape(r1 - r0, -1)
        if not np.array_equal(decode_assignment(bt.name, data, cols).dequantize(),
                              _values(scale[r0:r1], codes[r0:r1], G)):
            raise GSQError(f"internal error: {bt.name} blocks of rows {r0}-{r1 - 1} do not "
                           "decode to s*codes")
        out[r0:r1] = data
    return out


def exact_problem(qtype: str, qw: QuantizedWeight) -> str | None:
    """None if GGUF type `qtype` holds `qw` exactly (decodes to s*codes), else one-line reason."""
    return _problem(gguf_type(qtype), qw)


def default_type(qw: QuantizedWeight) -> str:
    """The smallest type (bits per weight) that holds `qw` exactly; F32 always does."""
    for name in _DEFAULT_ORDER:
        if _problem(TYPES[name], qw) is None:
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
    bt = gguf_type(qtype)
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


def _to_units(bt: GGUFType, s: np.ndarray, G: int):
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


def _snap_fp16(bt: GGUFType, s_unit: np.ndarray, bits) -> np.ndarray:
    limit = FP16_MAX / max(bt.zero_point, 1)  # Q4_1 / Q5_1 also store m = -8d / -16d
    return fp16_nearest(np.clip(s_unit, -limit, limit))


def _snap_signed(bt: GGUFType, s_unit: np.ndarray, bits) -> np.ndarray:
    t = s_unit.reshape(s_unit.shape[0], -1, QK_K // bt.sub_block)
    fit = snap_lattice(t, *bt.k_range)
    return (fit.step[..., None] * fit.k).reshape(s_unit.shape).astype(np.float32)


def _snap_affine(bt: GGUFType, s_unit: np.ndarray, bits) -> np.ndarray:
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
    bt = gguf_type(qtype)
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


def _refit(bt: GGUFType, qw: QuantizedWeight) -> QuantizedWeight:
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
