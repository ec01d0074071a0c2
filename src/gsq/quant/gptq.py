"""GPTQ with group-wise signed scales (Frantar et al. 2022; method §7).

One readable solver: columns are quantized left to right and each column's rounding error is
spread over the not-yet-quantized columns through the upper Cholesky factor of H⁻¹. A group's scale
is searched when the solver reaches its first column, on the already-updated weights (or, with
`static_groups`, on the original weights before the loop).

With `act_order` ("desc_act") the solver takes the columns in order of decreasing (damped) diag(H),
so the inputs that matter most are rounded first and their error is absorbed by the rest. Groups
stay those of the original column order (group k = columns k·g .. k·g+g-1), each column rounded
with its original group's scale, so the result is the same plain group-wise grid; as a group's
columns are then scattered over the solve, its scale must exist before the loop: `act_order`
implies `static_groups`.

With a GGUF target (`spec.target`) scales are searched among the type's storable ones: the
lattice (for K types the fp16 step d of each 256-column super-block) is fixed before the loop by
`lattice.target_lattice` on the original weights, and each group's scale is then searched on it
(`gsq.quant.lattice`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsq.quant.grids import round_to_grid, search_group_scales
from gsq.quant.hessian import damp_hessian, damp_hessians
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
    """Scales `(..., out, n)` of groups `x` `(..., out, n, g)` (groups `first..` of each row): the
    bf16 search, or the best scales of the target's lattice (no batch dimension then)."""
    if lattice is None:
        return search_group_scales(x.reshape(-1, *x.shape[-2:]), spec).reshape(x.shape[:-1])
    return lattice.search(x, first)


def _act_order(H: Tensor, dead: Tensor) -> Tensor:
    """Column order `(in,)`: decreasing damped diag(H), dead columns last, ties in input order."""
    key = torch.diag(H).masked_fill(dead, float("-inf"))
    return torch.sort(key, descending=True, stable=True).indices


def _solve(W: Tensor, Hinv: Tensor, scale: Tensor, groups: list[int], spec: QuantSpec, lattice,
           block_size: int, static: bool) -> Tensor:
    """Codes `(..., out, in)` of `W` `(..., out, in)` in solver order; `groups[j]` is the scale
    column of solver column j. Without `static`, a group's scale `scale[..., k]` is searched (and
    written) at its first column, on the updated weights. `W` is updated in place.

    A leading batch dimension (`W` `(B, out, in)`, `Hinv` `(B, in, in)`, `scale` `(B, out, n)`)
    solves B same-shape weights at once, each against its own Hessian (MoE experts).
    """
    cols = W.shape[-1]
    g = spec.group_size
    codes = torch.zeros(W.shape, dtype=torch.int8, device=W.device)
    bs = _solver_block_size(g, block_size)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[..., i1:i2].clone()  # (..., out, bs) working copy, updated in place
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[..., i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0 and not static:
                x = W1[..., i : i + g].unsqueeze(-2)  # (..., out, 1, g)
                scale[..., col // g] = _search(x, spec, lattice, col // g)[..., 0]
            s = scale[..., groups[col]]  # (..., out)
            w = W1[..., i]
            q = round_to_grid(w, s, spec)
            codes[..., col] = q.to(torch.int8)
            err = (w - s * q) / Hinv1[..., i, i].unsqueeze(-1)
            W1[..., i:] -= err.unsqueeze(-1) * Hinv1[..., i, i:].unsqueeze(-2)
            Err1[..., i] = err
        W[..., i2:] -= Err1 @ Hinv[..., i1:i2, i2:]
    return codes


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    spec: QuantSpec,
    percdamp: float = 0.1,
    block_size: int = 128,
    static_groups: bool = False,
    act_order: bool = False,
) -> QuantizedWeight:
    """Quantize `W` `(out, in)` against the layer Hessian `H` `(in, in)`.

    `static_groups`: search all group scales on the original weights before the loop.
    `act_order`: solve the columns in order of decreasing diag(H); implies `static_groups` (the
    codes and scales returned are in the original column order either way).
    """
    out, cols = W.shape
    g = spec.group_size
    if cols % g != 0:
        raise ValueError(f"group size {g} does not divide input width {cols}")
    W = W.detach().clone().float()
    H, dead = damp_hessian(H.float().to(W.device), percdamp)
    W[:, dead] = 0.0
    lattice = target_lattice(W, spec) if spec.target is not None else None
    static = static_groups or act_order
    if static:
        scale = _search(W.reshape(out, cols // g, g), spec, lattice, 0)  # (out, in/g)
    else:
        scale = torch.zeros(out, cols // g, dtype=torch.float32, device=W.device)
    perm = _act_order(H, dead) if act_order else None  # (in,) solver column -> input column
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    groups = (perm if perm is not None else torch.arange(cols)).div(g, rounding_mode="floor")
    Hinv = _inverse_cholesky_upper(H)  # (in, in), upper
    codes = _solve(W, Hinv, scale, groups.tolist(), spec, lattice, block_size, static)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]  # back to the input column order
    return QuantizedWeight(codes, scale, spec, lattice=lattice)


def layer_output_error(W: Tensor, W_q: Tensor, H: Tensor) -> float:
    """tr((W_q - W) H (W_q - W)ᵀ): the layer's expected output error under inputs with Hessian H."""
    dW = (W_q - W).double()
    return float(torch.einsum("oi,ij,oj->", dW, H.double(), dW))


def gptq_quantize_batched(
    W: Tensor,
    H: Tensor,
    spec: QuantSpec,
    percdamp: float = 0.1,
    block_size: int = 128,
    static_groups: bool = False,
) -> list[QuantizedWeight]:
    """`gptq_quantize` of B same-shape weights `W` `(B, out, in)`, each against its own Hessian
    `H` `(B, in, in)`, in one solve (one column loop for all: MoE experts).

    The arithmetic is that of `gptq_quantize` row for row, batched; act-order and GGUF targets
    are not batched (call `gptq_quantize` per weight for those).
    """
    if spec.target is not None:
        raise ValueError("batched GPTQ does not take GGUF targets; quantize one weight at a time")
    n, out, cols = W.shape
    g = spec.group_size
    if cols % g != 0:
        raise ValueError(f"group size {g} does not divide input width {cols}")
    W = W.detach().clone().float()
    H, dead = damp_hessians(H.float().to(W.device), percdamp)  # (B, in, in), (B, in)
    W.masked_fill_(dead.unsqueeze(1), 0.0)
    if static_groups:
        scale = _search(W.reshape(n, out, cols // g, g), spec, None, 0)  # (B, out, in/g)
    else:
        scale = torch.zeros(n, out, cols // g, dtype=torch.float32, device=W.device)
    groups = (torch.arange(cols) // g).tolist()
    Hinv = _inverse_cholesky_upper(H)  # (B, in, in), upper
    codes = _solve(W, Hinv, scale, groups, spec, None, block_size, static_groups)
    return [QuantizedWeight(codes[b], scale[b], spec) for b in range(n)]
