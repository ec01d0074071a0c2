"""Context managers that attach forward hooks to a block's linears and always remove them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from gsq.quant.hessian import HessianAccumulator


@contextmanager
def collect_hessians(block: nn.Module,
                     linear_names: list[str]) -> Iterator[dict[str, HessianAccumulator]]:
    """Accumulate H = (2/n) Σ x xᵀ of each named linear's inputs while the block runs."""
    accumulators: dict[str, HessianAccumulator] = {}
    handles = []
    for name in linear_names:
        linear = block.get_submodule(name)
        acc = HessianAccumulator(linear.in_features, device=linear.weight.device)
        accumulators[name] = acc
        handles.append(linear.register_forward_pre_hook(
            lambda module, args, acc=acc: acc.add(args[0].detach())))
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()
