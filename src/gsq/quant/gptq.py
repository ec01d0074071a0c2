"""GPTQ with group-wise signed scales (Frantar et al. 2022; method §7).

One readable solver: columns are quantized left to right and each column's rounding error is
spread over the not-yet-quantized columns through the upper Cholesky factor of H⁻¹. A group's scale
is searched when the solver reaches its first column, on the already-updated weights (or, with
`static_groups`, on the original weights before the loop).

With a GGUF target (`spec.target`) scales are searched among the type's storable ones: the
lattice (for K types the fp16 step d of each 256-column super-block) is fixed before the loop by
`lattice.target_lattice` on the original weights, and each group's scale is then searched on it
(`gsq.quant.lattice`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsq.quant.grids import round_to_grid, search_group_scales
from gsq.quant.hessian import damp_hessian
from gsq.quant.lattice import target_lattice
from gsq.quant.types import QuantizedWeight, QuantSpec


def _solver_block_size(group_size: int, block_size: int) -> int:
    """A block size that is a multiple of the group size, so a group never straddles two blocks."""
    return group_size * max(1, block_size // group_size)


def _inverse_cholesky_upper(H: Tensor) -> Tensor:
    """Upper Cholesky factor of H⁻¹ (fp32)."""
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def _search(x: Tensor, spec: QuantSpec, lattice, first: int) -> Tensor:
    """Scales `(out, n)` of groups `x` `(out, n, g)` (groups `first..` of each row): the bf16
    search, or the best scales of the target's lattice."""
    if lattice is None:
        return search_group_scales(x, spec)
    return lattice.search(x, first)


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    spec: QuantSpec,
    percdamp: float = 0.1,
    block_size: int = 128,
    static_groups: bool = False,
) -> QuantizedWeight:
    """Quantize `W` `(out, in)` against the layer Hessian `H` `(in, in)`."""
    out, cols = W.shape
    g = spec.group_size
    if cols % g != 0:
        raise ValueError(f"group size {g} does not divide input width {cols}")
    W = W.detach().clone().float()
    H, dead = damp_hessian(H.float().to(W.device), percdamp)
    W[:, dead] = 0.0
    Hinv = _inverse_cholesky_upper(H)  # (in, in), upper
    scale = torch.zeros(out, cols // g, dtype=torch.float32, device=W.device)
    codes = torch.zeros(out, cols, dtype=torch.int8, device=W.device)
    lattice = target_lattice(W, spec) if spec.target is not None else None
    if static_groups:
        scale = _search(W.reshape(out, cols // g, g), spec, lattice, 0)
    bs = _solver_block_size(g, block_size)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()  # (out, bs) working copy, updated in place
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0 and not static_groups:
                x = W1[:, i : i + g].unsqueeze(1)  # (out, 1, g)
                scale[:, col // g] = _search(x, spec, lattice, col // g)[:, 0]
            s = scale[:, col // g]
            w = W1[:, i]
            q = round_to_grid(w, s, spec)
            codes[:, col] = q.to(torch.int8)
            err = (w - s * q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return QuantizedWeight(codes, scale, spec, lattice=lattice)


def layer_output_error(W: Tensor, W_q: Tensor, H: Tensor) -> float:
    """tr((W_q - W) H (W_q - W)ᵀ): the layer's expected output error under inputs with Hessian H."""
    dW = (W_q - W).double()
    return float(torch.einsum("oi,ij,oj->", dW, H.double(), dW))
