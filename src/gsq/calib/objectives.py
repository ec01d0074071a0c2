"""Stage objectives: MSE of a sub-block's output against its full-precision output (method §3).

The trainable linears' weights are swapped in with `torch.func.functional_call`, so the soft
weights' gradients flow to the quantizers while the Hugging Face modules stay untouched. Which
parameters a set of linear weights becomes is the adapter's business (`params`, e.g.
`ModelAdapter.trial_params`: MoE experts' weights are stacked into fused parameters). Targets are
computed once per stage with the block's original weights (caching them is valid, method §3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from gsq.calib.cache import ActivationStore


class _SubBlock(nn.Module):
    """Wraps `fn(block, x)` as a module so that `functional_call` can replace the block's
    weights."""

    def __init__(self, block: nn.Module, fn: Callable[[nn.Module, Tensor], Tensor]) -> None:
        super().__init__()
        self.block = block
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.block, x)


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ActivationObjective:
    """Mean squared error of `fn(block, x)` with trial weights against cached targets.

    inputs/targets: `(N, T, hidden)`; `weights` map linear names (e.g. "mlp.up_proj") to
    `(out, in)`; `params(weights)` gives the block parameters (paths relative to the block) that
    put them in place (default: "{name}.weight"). With `autocast` ("bf16"/"fp16") the sub-block
    runs under `torch.autocast` on the device (16-bit matmuls); the MSE is always taken in fp32.
    """

    def __init__(self, block: nn.Module, fn: Callable[[nn.Module, Tensor], Tensor],
                 train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], micro_batch_size: int,
                 device: torch.device, autocast: str | None = None,
                 params: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None) -> None:
        self.module = _SubBlock(block, fn)
        self.params = params or (lambda weights: {f"{n}.weight": w for n, w in weights.items()})
        self.train_in, self.train_out = train
        self.val_in, self.val_out = val
        self.n_train = self.train_in.shape[0]
        self.micro = micro_batch_size
        self.device = device
        self.dtype = next(block.parameters()).dtype
        self.autocast = _AUTOCAST_DTYPES[autocast] if autocast else None

    def _forward(self, weights: dict[str, Tensor], x: Tensor) -> Tensor:
        params = {f"block.{path}": w for path, w in self.params(weights).items()}
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            return functional_call(self.module, params, (x,), strict=False)

    def loss(self, weights: dict[str, Tensor], indices: Tensor) -> Tensor:
        idx = indices.to(self.train_in.device)
        x, y = self.train_in[idx].to(self.device), self.train_out[idx].to(self.device)
        return F.mse_loss(self._forward(weights, x).float(), y.float())

    @torch.no_grad()
    def val_loss(self, weights: dict[str, Tensor]) -> float:
        total, count = 0.0, 0
        for x, y in zip(self.val_in.split(self.micro), self.val_out.split(self.micro), strict=True):
            pred = self._forward(weights, x.to(self.device)).float()
            total += float(F.mse_loss(pred, y.to(self.device).float(), reduction="sum"))
            count += y.numel()
        return total / count


@torch.no_grad()
def map_batches(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int,
                device: torch.device | None = None, store: ActivationStore | None = None) -> Tensor:
    """Apply `fn` to `x` `(N, ...)` in batches along dim 0, each batch moved to `device` (default:
    x's device) for the call; results are gathered back on x's device (e.g. host-offloaded buffers),
    into a tensor from `store` when x is on the host and a store is given (RAM or a spill file).
    """
    device = x.device if device is None else device
    if store is None or x.device.type != "cpu":
        return torch.cat([fn(chunk.to(device)).to(x.device) for chunk in x.split(batch_size)])
    out, start = None, 0
    for chunk in x.split(batch_size):
        y = fn(chunk.to(device)).to(x.device)
        if out is None:
            out = store.empty((len(x), *y.shape[1:]), y.dtype)
        out[start:start + len(y)] = y
        start += len(y)
    return out
