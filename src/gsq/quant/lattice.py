"""Scale lattices of GGUF targets: scale search, per-group search and projection on the scales a
GGUF type stores exactly (formats.md B.5, B.6; method §5, §7; issue 3).

An fp scale rounded onto a K-quant lattice after the fact loses accuracy (B.6: median 8 % scale
error for Q2_K at g32), and the codes were chosen for the old scale. Here every stage picks its
scales among the storable ones, so the written GGUF equals the evaluated model weight for weight:

- fp16 types (Q4_0, Q2_0, TQ1_0, TQ2_0): any fp16 value. The signed MSE-shrink search of
  `grids.search_group_scales` runs with its candidates rounded to fp16 instead of bf16
  (`Fp16Lattice`); projection is rounding to fp16.
- K types (Q2_K, Q3_K, Q4_K): per row and 256-column super-block one fp16 step `d`, per sub-block
  (group) an integer `k`, scale `d*k` (`KLattice`). `d` is chosen once, on the original weights
  (`lattice_init`): the unconstrained signed search gives scales `s0`; then, per super-block, `d`
  is searched over `fp16_ceil(f * d0)`, `d0 = max_j s0_j / kmax_j` (the smallest step that
  reaches every searched scale, which is what "search in bf16 then snap" uses) and f in
  D_FACTORS, each sub-block taking the best of the three `k` nearest `s0_j / d`; the super-block
  keeps the `d` (and, for Q2_K/Q4_K, the sign pattern) with the least total error `sum |s*q-x|^2.4`
  (the norm of the shrink search). GPTQ then keeps `d` and searches each group's `k` over its
  whole range when it reaches the group, on the updated weights; GSQ keeps `d` and trains the
  scales through `project_ste` (straight-through rounding of `k`, clamped to its range).
- Q2_K/Q4_K are affine (`w = d*k*q - dmin*m`); only their symmetric sub-lattice is used: a group
  with scale sign `o` stores `q = o*c + z` with offset `z*|s|` in the min field. One `dmin` per
  super-block ties the offsets together, so the sub-block signs are fixed per super-block when `d`
  is chosen and bound `k`: one sign for all groups keeps `k <= kmax` (uniform offset), mixed signs
  need `k <= kmax // z` where the offset is `z` (Q2_K: 7 for the groups on the {-2..1} side). The
  init search tries the searched sign pattern, all positive and all negative. `k >= 1` always
  (no zero scales), so each lattice point encodes whatever codes of the grid a group gets.

Every lattice value is exact in float32 (fp16 `d` times `|k| <= 63`), and the GGUF fitter in
`gsq.export.gguf_blocks` recovers an encoding of it (its largest common step divides `d*k`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gsq.quant.grids import SEARCH_NORM, group_view, round_to_grid, search_group_scales
from gsq.quant.target import TargetType, target_type
from gsq.quant.types import QuantizedWeight, QuantSpec

__all__ = ["D_FACTORS", "Fp16Lattice", "KLattice", "lattice_init", "project_ste", "target_lattice",
           "target_rtn", "to_fp16_grid"]

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24  # smallest fp16 subnormal
# Multipliers of the smallest sufficient step d0 tried per super-block: f < 1 clamps the largest
# group's k at kmax (a shrink), f > 1 trades range for the other groups' rounding.
D_FACTORS = tuple(round(0.8 + 0.025 * i, 3) for i in range(17))  # 0.800 .. 1.200
K_NEIGHBOURS = (-1, 0, 1)  # k tried around round(s0 / d) for each step candidate
_CHUNK_ELEMENTS = 1 << 22  # weights per row chunk of the init search


def to_fp16_grid(scale: Tensor) -> Tensor:
    """Nearest fp16 value (kept fp32), saturating at ±65504; a non-zero scale never becomes 0."""
    r = scale.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)
    tiny = torch.where(scale < 0, -FP16_TINY, FP16_TINY)
    return torch.where((r == 0) & (scale != 0), tiny, r)


def fp16_ceil(x: Tensor) -> Tensor:
    """Smallest fp16 value >= x for positive x `(...)`, kept fp32 (clamped to fp16's range)."""
    x = x.float().clamp(FP16_TINY, FP16_MAX)
    h = x.to(torch.float16)
    up = (h.view(torch.int16) + 1).view(torch.float16)  # next fp16 above a positive value
    return torch.where(h.float() < x, up, h).float()


def group_error(x: Tensor, scale: Tensor, spec: QuantSpec) -> Tensor:
    """sum |s*q - x|^2.4 per group: x `(..., g)`, scale `(...)` -> `(...)` (q nearest codes)."""
    s = scale.unsqueeze(-1)
    return (s * round_to_grid(x, s, spec) - x).abs().pow(SEARCH_NORM).sum(-1)


def _valid_k(k: Tensor, ratio: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    """k clamped to [kmin, kmax], a 0 replaced by ±1 (the side of `ratio`): no zero scales."""
    k = torch.where(k == 0, torch.where(ratio >= 0, 1.0, -1.0), k)
    return torch.minimum(torch.maximum(k, kmin), kmax)


class Fp16Lattice:
    """fp16 block types: every fp16 value is a storable scale."""

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec

    def project(self, scale: Tensor) -> Tensor:
        return to_fp16_grid(scale)

    def search(self, x: Tensor, first: int = 0) -> Tensor:
        """Best fp16 scales `(rows, n)` of groups `x` `(rows, n, g)` (signed shrink search)."""
        return search_group_scales(x, self.spec, grid=to_fp16_grid)

    def to(self, device: torch.device | str) -> Fp16Lattice:
        return self


@dataclass
class KLattice:
    """K types: group j of a row may use `step_j * k`, k integer in [kmin_j, kmax_j], k != 0.

    step: float32 `(out, n_groups)`, `±d` of the group's super-block (the sign of an affine group);
    kmin / kmax: float32 `(out, n_groups)` holding integers.
    """

    spec: QuantSpec
    step: Tensor
    kmin: Tensor
    kmax: Tensor

    def project(self, scale: Tensor) -> Tensor:
        """Nearest lattice scale of each group (round k, clamp to its range; never 0)."""
        step, kmin, kmax = (t.to(scale.device) for t in (self.step, self.kmin, self.kmax))
        ratio = scale.float() / step
        return step * _valid_k(torch.round(ratio), ratio, kmin, kmax)

    def search(self, x: Tensor, first: int = 0, max_elements: int = 2**24) -> Tensor:
        """Best lattice scales `(rows, n)` for groups `x` `(rows, n, g)`, which are the groups
        `first .. first + n - 1` of each row: every allowed k tried, least sum |s*q - x|^2.4."""
        x = x.float()
        cols = slice(first, first + x.shape[1])
        step, kmin, kmax = (t[:, cols].to(x.device) for t in (self.step, self.kmin, self.kmax))
        lo, hi = target_type(self.spec.target).k_range  # the type's range: no host sync
        ks = torch.tensor([k for k in range(lo, hi + 1) if k], device=x.device,
                          dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
        chunk = max(1, max_elements // max(x.numel(), 1))
        errors = []
        for k in ks.split(chunk):
            err = group_error(x.unsqueeze(0), step * k, self.spec)  # (c, rows, n)
            errors.append(err.masked_fill((k < kmin) | (k > kmax), float("inf")))
        best = torch.cat(errors).argmin(dim=0, keepdim=True)  # (1, rows, n)
        return step * ks.expand(-1, *step.shape).gather(0, best).squeeze(0)

    def to(self, device: torch.device | str) -> KLattice:
        return KLattice(self.spec, self.step.to(device), self.kmin.to(device),
                        self.kmax.to(device))


ScaleLattice = Fp16Lattice | KLattice


class _ProjectScale(torch.autograd.Function):
    """Forward: the lattice projection of the scales; backward: the identity (straight-through)."""

    @staticmethod
    def forward(ctx, scale: Tensor, lattice: ScaleLattice) -> Tensor:  # noqa: D102
        return lattice.project(scale.detach())

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return grad, None


def project_ste(scale: Tensor, lattice: ScaleLattice) -> Tensor:
    """`lattice.project(scale)` with the gradient passed straight through to `scale`."""
    return _ProjectScale.apply(scale, lattice)


# --------------------------------------------------------------------------------------------
# K-type initial search


def _affine_kmax(tt: TargetType, spec: QuantSpec, signs: Tensor) -> Tensor:
    """Largest k per group `(..., n_sub)` for sub-block scale signs `signs` (±1) of Q2_K/Q4_K.

    Offsets z with `0 <= o*c + z <= code_max` for every code c of the grid (o = the group's sign
    times a super-block flip). One offset Z for all groups (from `tt.offsets`): dmin = Z*d, m = k,
    k <= kmax. Otherwise dmin = d, m = z*k: k <= kmax // z. The flip with the larger smallest
    bound wins (+1 on ties), as in the exporter's `plan_affine`.
    """
    kmax = tt.k_range[1]
    best = None
    for flip in (1, -1):
        o = signs * flip
        lo = torch.where(o > 0, float(spec.qmin), float(-spec.qmax))
        hi = torch.where(o > 0, float(spec.qmax), float(-spec.qmin))
        zlo, zhi = (-lo).clamp(min=0), tt.code_max - hi
        uniform = torch.zeros(signs.shape[:-1], dtype=torch.bool, device=signs.device)
        for z in tt.offsets:
            uniform |= ((zlo <= z) & (z <= zhi)).all(-1)
        mixed = torch.floor(kmax / zlo.clamp(min=1))
        bound = torch.where(uniform.unsqueeze(-1), float(kmax), mixed)
        if best is None:
            best = bound
        else:
            wins = bound.amin(-1, keepdim=True) > best.amin(-1, keepdim=True)
            best = torch.where(wins, bound, best)
    return best


def _plans(tt: TargetType, spec: QuantSpec, s0: Tensor):
    """Candidate (step sign, kmin, kmax, target) per group `(rows, n_sb, n_sub)`: the target is
    the scale to approach in units of the step sign (|s0| for affine groups, s0 for Q3_K)."""
    one = torch.ones_like(s0)
    if tt.family == "signed_k":
        yield one, one * tt.k_range[0], one * tt.k_range[1], s0
        return
    searched = torch.where(s0 < 0, -1.0, 1.0)
    for signs in (searched, one, -one):
        yield signs, one, _affine_kmax(tt, spec, signs), s0.abs()


def _nearest_ks(x: Tensor, ratio: Tensor, step: Tensor, kmin: Tensor, kmax: Tensor,
                spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per group the best of the k next to `ratio`: scales and errors `(rows, n_sb, n_sub)`."""
    k0 = torch.round(ratio)
    best_err = best_scale = None
    for dk in K_NEIGHBOURS:
        scale = step * _valid_k(k0 + dk, ratio, kmin, kmax)
        err = group_error(x, scale, spec)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    return best_scale, best_err


def _k_search(x: Tensor, s0: Tensor, tt: TargetType, spec: QuantSpec):
    """Super-block search of d (and sign pattern) for groups `x` `(rows, n_sb, n_sub, g)` around
    the searched scales `s0` `(rows, n_sb, n_sub)`. Returns scale, step, kmin, kmax, same shape."""
    best_err = torch.full(s0.shape[:-1], float("inf"), device=s0.device)
    best = [torch.zeros_like(s0) for _ in range(4)]
    for sign, kmin, kmax, target in _plans(tt, spec, s0):
        d0 = torch.where(target > 0, target / kmax, target / kmin).amax(-1)  # (rows, n_sb)
        for f in D_FACTORS:
            d = fp16_ceil(d0 * f).unsqueeze(-1)  # (rows, n_sb, 1)
            scale, err = _nearest_ks(x, target / d, sign * d, kmin, kmax, spec)
            total = err.sum(-1)
            better = (total < best_err).unsqueeze(-1)
            best_err = torch.minimum(total, best_err)
            new = (scale, (sign * d).expand_as(sign), kmin, kmax)
            best = [torch.where(better, n, b) for n, b in zip(new, best, strict=True)]
    return best


def _k_init(W: Tensor, spec: QuantSpec, tt: TargetType) -> tuple[Tensor, KLattice]:
    out, cols = W.shape
    n_sub = tt.row_unit // tt.group_size
    rows = max(1, _CHUNK_ELEMENTS // cols)
    parts = []
    for r0 in range(0, out, rows):
        x = group_view(W[r0 : r0 + rows].float(), spec.group_size)  # (r, n_groups, g)
        s0 = search_group_scales(x, spec)  # (r, n_groups), the unconstrained signed search
        r = x.shape[0]
        found = _k_search(x.reshape(r, -1, n_sub, spec.group_size), s0.reshape(r, -1, n_sub), tt,
                          spec)
        parts.append([t.reshape(r, -1) for t in found])
    scale, step, kmin, kmax = (torch.cat(ts) for ts in zip(*parts, strict=True))
    return scale, KLattice(spec, step, kmin, kmax)


def lattice_init(W: Tensor, spec: QuantSpec) -> tuple[Tensor, ScaleLattice]:
    """Initial scales `(out, n_groups)` of `W` `(out, in)` on `spec.target`'s lattice, and the
    lattice (see the module doc). ValueError if the rows are not whole blocks of the target."""
    tt = target_type(spec.target)
    if W.shape[1] % tt.row_unit:
        raise ValueError(f"input width {W.shape[1]} is not a multiple of the GGUF {tt.name} block "
                         f"size {tt.row_unit}")
    if tt.is_k:
        return _k_init(W, spec, tt)
    lattice = Fp16Lattice(spec)
    return lattice.search(group_view(W.float(), spec.group_size)), lattice


def target_lattice(W: Tensor, spec: QuantSpec) -> ScaleLattice:
    """The lattice `lattice_init` would choose for `W` (fp16 types: no search needed)."""
    if target_type(spec.target).is_k:
        return lattice_init(W, spec)[1]
    return Fp16Lattice(spec)


def target_rtn(W: Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest on the target's lattice: `lattice_init` scales, nearest codes."""
    scale, lattice = lattice_init(W, spec)
    groups = group_view(W.float(), spec.group_size)
    codes = round_to_grid(groups, scale.unsqueeze(-1), spec).reshape(W.shape).to(torch.int8)
    return QuantizedWeight(codes, scale, spec, lattice=lattice)
