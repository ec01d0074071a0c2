"""Round-to-nearest with the signed MSE-searched group scales (method §7, "Other initialisers")."""

from __future__ import annotations

import torch
from torch import Tensor

from gsq.quant.grids import group_view, round_to_grid, search_group_scales
from gsq.quant.lattice import target_rtn
from gsq.quant.types import QuantizedWeight, QuantSpec


def rtn_quantize(W: Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Quantize `W` `(out, in)` group by group: searched scale, then nearest code (scales searched
    on the GGUF target's lattice when `spec.target` is set, `lattice.target_rtn`)."""
    if spec.target is not None:
        return target_rtn(W, spec)
    groups = group_view(W.float(), spec.group_size)  # (out, n_groups, g)
    scale = search_group_scales(groups, spec)  # (out, n_groups)
    codes = round_to_grid(groups, scale.unsqueeze(-1), spec)
    return QuantizedWeight(codes.reshape(W.shape).to(torch.int8), scale, spec)
