"""Scales a GGUF block type can store exactly, and snapping scales onto them (formats.md B.5, B.6).

Pure numpy; knows nothing about byte layouts (those live in `gsq.gguf.layouts`, with the fp16
facts `fp16_exact` / `fp16_nearest`).

- fp16 block types (Q4_0, Q4_1, Q8_0, Q2_0, TQ1_0, TQ2_0) store one IEEE half `d` per block, so a
  scale is storable iff it is fp16-representable (`fp16_exact`).
- K-quants store one fp16 `d` per 256-column super-block and a small integer `k` per 16/32-column
  sub-block: the storable sub-block scales are the lattice `{d*k}` (B.6).

Finding a lattice step. Every finite float is `odd * 2**exp` with an odd integer `odd`. A step
`D = M * 2**E` (M odd) divides all of `t_1..t_n` into integers iff `M` divides every `odd_i` and
`E <= min exp_i`; `D` is an fp16 value iff `M <= 2047`, `E >= -24` and `D <= 65504`. So the largest
such step is `(largest divisor of gcd(odd_i) that is <= 2047) * 2**min(exp_i)` (exponent capped at
the fp16 maximum). Any other valid step is smaller, hence gives integer ratios of larger magnitude
and the same sign: if the largest step does not fit a type's integer range, no step does. This makes
the exact test a closed form instead of a search over candidate steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gsq.gguf.layouts import FP16_MAX

FP16_MANT_MAX = 2047  # largest odd fp16 significand (11 bits)
FP16_MIN_EXP = -24  # exponent of the smallest fp16 subnormal, 2**-24
MAX_RATIO = 255  # ratios t/D beyond this fit no K-quant sub-block scale (int8 at most)
_NO_EXP = np.iinfo(np.int64).max // 2  # exponent given to zeros: never the minimum


def fp16_ceil(x: np.ndarray) -> np.ndarray:
    """Smallest fp16 value `>= x` (as float32) for finite `0 <= x <= 65504`."""
    h = np.asarray(x, dtype=np.float32).astype(np.float16)
    below = h.astype(np.float32) < x
    h = np.where(below, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float32)


def dyadic_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`|x| = odd * 2**exp` for float32 `x`: int64 `(odd, exp)`; zeros give `(0, huge)`."""
    mant, exp = np.frexp(np.abs(np.asarray(x, dtype=np.float32)).astype(np.float64))
    m = (mant * (1 << 24)).astype(np.int64)  # exact: float32 has 24 significant bits
    low = m & -m  # lowest set bit, 0 for zeros
    tz = np.maximum(np.frexp(low.astype(np.float64))[1] - 1, 0)  # log2(low)
    odd = np.where(m > 0, m >> tz, 0)
    exp = np.where(m > 0, exp.astype(np.int64) - 24 + tz, _NO_EXP)
    return odd, exp


def _largest_divisor_at_most(g: np.ndarray, limit: int) -> np.ndarray:
    """Largest divisor of odd `g` that is `<= limit` with cofactor `<= MAX_RATIO`; 0 if none."""
    out = np.where(g <= limit, g, 0)
    todo = g > limit
    for j in range(3, MAX_RATIO + 1, 2):  # ascending cofactor = descending divisor
        if not todo.any():
            break
        hit = todo & (g % j == 0) & (g // j <= limit)
        out = np.where(hit, g // j, out)
        todo &= ~hit
    return out


def max_fp16_step(t: np.ndarray) -> np.ndarray:
    """Largest fp16 `D > 0` with every `t[..., i] / D` an integer, shape `t.shape[:-1]`.

    0 where all `t` are zero; NaN where no fp16 step exists (with ratios up to MAX_RATIO).
    """
    odd, exp = dyadic_parts(t)  # (..., n)
    g = np.gcd.reduce(odd, axis=-1)  # (...,), zeros ignored
    e_min = exp.min(axis=-1)
    mant = _largest_divisor_at_most(g, FP16_MANT_MAX)
    with np.errstate(divide="ignore"):
        e_cap = np.floor(np.log2(FP16_MAX / np.maximum(mant, 1))).astype(np.int64)
    e = np.minimum(e_min, e_cap)
    ok = (mant > 0) & (e >= FP16_MIN_EXP)
    step = np.where(ok, mant * np.exp2(np.where(ok, e, 0).astype(np.float64)), np.nan)
    return np.where(g == 0, 0.0, step).astype(np.float32)


def lattice_ratios(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest step and the integer ratios on it: `(step (...,), k int32 (..., n))`, `t = step*k`.

    `step` is NaN where no fp16 step exists (then `k` is 0); check `k` against a type's range.
    """
    t = np.asarray(t, dtype=np.float32)
    step = max_fp16_step(t)
    valid = (step > 0)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(valid, t / np.where(valid, step[..., None], 1), 0.0)
    k = np.clip(ratio, -(2**30), 2**30).astype(np.int32)  # exact integers where step is valid
    return step, k


@dataclass
class LatticeFit:
    """Per super-block step and per sub-block integer ratio: `t = step * k` where `ok`."""

    step: np.ndarray  # float32 (...,) fp16-valued, >= 0 (0: all-zero super-block)
    k: np.ndarray  # int32 (..., n)
    ok: np.ndarray  # bool (...,): t = step * k exactly with lo <= k <= hi


def fit_lattice(t: np.ndarray, lo, hi) -> LatticeFit:
    """Exact fit of `t` (..., n) float32 to `{D*k}` with fp16 `D` and integer `lo <= k <= hi`.

    `lo`/`hi` broadcast against `t` (per sub-block bounds). Uses the largest step (see the module
    docstring), which is the best choice for every bound that contains 0.
    """
    step, k = lattice_ratios(t)
    ok = np.isfinite(step) & ((k >= lo) & (k <= hi)).all(-1)
    return LatticeFit(np.nan_to_num(step), k, ok)


def snap_lattice(t: np.ndarray, lo, hi) -> LatticeFit:
    """Nearest-ish lattice point per sub-block: exact fits are kept, the rest use
    `D = fp16_ceil(max(t/hi, t/lo))` (every ratio in range) and `k = clip(round(t/D), lo, hi)`."""
    t = np.asarray(t, dtype=np.float32)
    exact = fit_lattice(t, lo, hi)
    lo_b = np.broadcast_to(lo, t.shape).astype(np.float32)
    hi_b = np.broadcast_to(hi, t.shape).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(t > 0, t / hi_b, np.where(t < 0, t / lo_b, 0))
    need = np.where(np.isfinite(need) & (need > 0), need, 0)  # a sign the range lacks: k = 0
    step = fp16_ceil(np.minimum(need.max(-1), FP16_MAX))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(step[..., None] > 0, t / np.maximum(step[..., None], 1e-30), 0.0)
    k = np.clip(np.rint(ratio), lo_b, hi_b).astype(np.int32)
    keep = exact.ok[..., None]
    return LatticeFit(
        np.where(exact.ok, exact.step, step), np.where(keep, exact.k, k), np.ones_like(exact.ok)
    )


@dataclass
class AffinePlan:
    """How Q2_K/Q4_K (`w = d*k*q - dmin*m`) hold one super-block of oriented codes `c'`.

    A sub-block with scale magnitude `d*k` stores `q = c' + z` and offset `dmin*m = z*d*k`.
    uniform: one offset `Z` for all sub-blocks, `dmin = Z*d`, `m = k`, so `k <= kmax`.
    mixed (Z = 0): `dmin = d`, `m = z*k` with each sub-block's smallest feasible `z`, so
    `k <= kmax // z`.
    """

    z: np.ndarray  # int32 (..., n) offset per sub-block
    Z: np.ndarray  # int32 (...,) uniform offset, 0 = mixed
    bound: np.ndarray  # int32 (..., n) largest allowed k
    feasible: np.ndarray  # bool (...,): every sub-block's codes fit some offset


def plan_affine(cmin: np.ndarray, cmax: np.ndarray, qmax: int, kmax: int, offsets) -> AffinePlan:
    """Offsets for oriented code ranges `cmin..cmax` (..., n); `offsets`: uniform Zs, preferred
    first."""
    zlo = np.maximum(0, -cmin)
    zhi = qmax - cmax
    feasible = (zlo <= zhi).all(-1)
    Z = np.zeros(cmin.shape[:-1], dtype=np.int32)
    for z in reversed(offsets):  # the first preference is assigned last and wins
        Z = np.where(((zlo <= z) & (z <= zhi)).all(-1), z, Z)
    uniform = (Z > 0)[..., None]
    z = np.where(uniform, Z[..., None], zlo).astype(np.int32)
    bound = np.where(uniform, kmax, kmax // np.maximum(zlo, 1)).astype(np.int32)
    return AffinePlan(z, Z, bound, feasible)


def orient_range(cmin, cmax, sign) -> tuple[np.ndarray, np.ndarray]:
    """Range of `sign * c` for codes in `cmin..cmax` (sign in {-1, 0, 1}; 0 gives 0..0)."""
    lo = np.where(sign > 0, cmin, np.where(sign < 0, -cmax, 0))
    hi = np.where(sign > 0, cmax, np.where(sign < 0, -cmin, 0))
    return lo, hi
