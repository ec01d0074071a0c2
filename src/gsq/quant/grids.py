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
    """Round fp32 scales to the nearest bfloat16 value, kept as fp32 (scales are stored in 16 bits)."""
    return scale.to(torch.bfloat16).to(torch.float32)


def round_to_grid(x: Tensor, scale: Tensor, spec: QuantSpec) -> Tensor:
    """Codes clamp(round(x / scale)) for x `(..., g)` and scale broadcastable to it."""
    return torch.clamp(torch.round(x / scale), spec.qmin, spec.qmax)


def search_group_scales(x: Tensor, spec: QuantSpec) -> Tensor:
    """Signed MSE-shrink scale search for groups `x` of shape `(rows, n_groups, g)`.

    For p in SHRINK_FACTORS and both signs, s = ±2p·max|x| / (levels - 1); keep the s with the least
    sum |s·q - x|^2.4. A negative s flips the asymmetric 2-bit grid {-2..1} to {-1..2}. All-zero
    groups use max|x| = 1 so that the scale stays finite and non-zero (pitfall P3).
    Returns fp32 scales `(rows, n_groups)` rounded to bfloat16.
    """
    x = x.float()
    xmax = x.abs().amax(dim=-1)
    xmax = torch.where(xmax > 0, xmax, torch.ones_like(xmax))
    best_err = torch.full_like(xmax, float("inf"))
    best_scale = torch.zeros_like(xmax)
    signs = (1.0, -1.0) if spec.qmin != -spec.qmax else (1.0,)  # symmetric grids need one sign
    for p in SHRINK_FACTORS:
        for sign in signs:
            s = to_bf16_grid(sign * 2.0 * p * xmax / (spec.levels - 1))
            q = round_to_grid(x, s.unsqueeze(-1), spec)
            err = (s.unsqueeze(-1) * q - x).abs().pow(SEARCH_NORM).sum(dim=-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s, best_scale)
    return best_scale


def group_view(W: Tensor, group_size: int) -> Tensor:
    """`(out, in)` -> `(out, in // g, g)`; raises if g does not divide the input width."""
    out, cols = W.shape
    if cols % group_size != 0:
        raise ValueError(f"group size {group_size} does not divide input width {cols}")
    return W.reshape(out, cols // group_size, group_size)


def expand_scale(scale: Tensor, group_size: int) -> Tensor:
    """`(out, n_groups)` -> `(out, n_groups * g)`, each scale repeated over its group's columns."""
    return scale.repeat_interleave(group_size, dim=1)
