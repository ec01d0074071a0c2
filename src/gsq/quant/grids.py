"""Grids, scale search and round-to-nearest primitives (method §5, §7).

All functions work on `(out, in)` weights viewed as `(out, n_groups, group_size)` tiles.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsq.quant.types import QuantSpec

# Shrink factors of the scale search: p = 1.00, 0.99, ..., 0.21 (80 values, method §7).
SHRINK_FACTORS = tuple(round(1.0 - 0.01 * i, 2) for i in range(80))
# Exponent of the search's error norm, sum |s*q - x|^2.4 (as in the GPTQ reference code).
SEARCH_NORM = 2.4


def to_bf16_grid(scale: Tensor) -> Tensor:
    """Round fp32 scales to the nearest bfloat16 value, kept as fp32
    (scales are stored in 16 bits)."""
    return scale.to(torch.bfloat16).to(torch.float32)


def round_to_grid(x: Tensor, scale: Tensor, spec: QuantSpec) -> Tensor:
    """Codes clamp(round(x / scale)) for x `(..., g)` and scale broadcastable to it."""
    return torch.clamp(torch.round(x / scale), spec.qmin, spec.qmax)


def _candidate_scales(xmax: Tensor, spec: QuantSpec, grid=to_bf16_grid) -> Tensor:
    """`(C, rows, n_groups)` candidates ±2p·max|x|/(levels-1), p in SHRINK_FACTORS (p = 1 only
    for the "absmax" search), rounded by `grid` (bf16 by default)."""
    factors = SHRINK_FACTORS if spec.scale_search == "mse" else SHRINK_FACTORS[:1]
    p = torch.tensor(factors, dtype=torch.float32, device=xmax.device)
    signs = (1.0, -1.0) if spec.qmin != -spec.qmax else (1.0,)  # symmetric grids need one sign
    # order p=1.00(+), 1.00(-), 0.99(+), ...: the search keeps the first best candidate
    factors = torch.stack([sign * 2.0 * p / (spec.levels - 1) for sign in signs], 1).flatten()
    return grid(factors.view(-1, 1, 1) * xmax.unsqueeze(0))


def search_group_scales(x: Tensor, spec: QuantSpec, max_elements: int = 2**24,
                        grid=to_bf16_grid) -> Tensor:
    """Signed MSE-shrink scale search for groups `x` of shape `(rows, n_groups, g)`.

    For p in SHRINK_FACTORS (p = 1 only with spec.scale_search "absmax") and both signs,
    s = ±2p·max|x| / (levels - 1); keep the s with the least sum |s·q - x|^2.4 (the first on ties,
    in the order p = 1.00 → 0.21, + before -). A negative s flips the asymmetric 2-bit grid
    {-2..1} to {-1..2}. All-zero groups use max|x| = 1 so the scale
    stays finite and non-zero (pitfall P3). Candidates are evaluated in chunks of at most
    `max_elements` values at once (no host sync; 2**24: temporaries of 64 MB, above glibc's
    largest mmap threshold so they go back to the system when freed, and as fast on CPU as larger
    chunks). Returns fp32 scales `(rows, n_groups)` on the
    bfloat16 grid, or on `grid`'s values (a rounding function, e.g. to fp16 for GGUF targets).
    """
    x = x.float()
    xmax = x.abs().amax(dim=-1)
    xmax = torch.where(xmax > 0, xmax, torch.ones_like(xmax))
    candidates = _candidate_scales(xmax, spec, grid)  # (C, rows, n_groups)
    chunk = max(1, max_elements // max(x.numel(), 1))
    errors = []
    for cand in candidates.split(chunk):
        q = round_to_grid(x.unsqueeze(0), cand.unsqueeze(-1), spec)  # (c, rows, n_groups, g)
        errors.append((cand.unsqueeze(-1) * q - x.unsqueeze(0)).abs().pow(SEARCH_NORM).sum(-1))
    best = torch.cat(errors).argmin(dim=0, keepdim=True)  # (1, rows, n_groups), first minimum
    return candidates.gather(0, best).squeeze(0)


def group_view(W: Tensor, group_size: int) -> Tensor:
    """`(out, in)` -> `(out, in // g, g)`; raises if g does not divide the input width."""
    out, cols = W.shape
    if cols % group_size != 0:
        raise ValueError(f"group size {group_size} does not divide input width {cols}")
    return W.reshape(out, cols // group_size, group_size)


def expand_scale(scale: Tensor, group_size: int) -> Tensor:
    """`(out, n_groups)` -> `(out, n_groups * g)`, each scale repeated over its group's columns."""
    return scale.repeat_interleave(group_size, dim=1)
