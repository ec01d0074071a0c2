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

from gsq import dist
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
                device: torch.device | None = None, store: ActivationStore | None = None,
                shard: bool = False) -> Tensor:
    """Apply `fn` to `x` `(N, ...)` in batches along dim 0, each batch moved to `device` (default:
    x's device) for the call; results are gathered back on x's device (e.g. host-offloaded buffers),
    into a tensor from `store` when x is on the host and a store is given (RAM or a spill file).

    shard: under several processes (`gsq.dist`), batch c is computed by rank c mod N only and
    shared (`_map_sharded`); every rank returns the tensor one process computes, bit for bit.
    """
    device = x.device if device is None else device
    if shard and dist.world().size > 1:
        return _map_sharded(fn, x, batch_size, device, store)
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


def _map_sharded(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int,
                 device: torch.device, store: ActivationStore | None) -> Tensor:
    """`map_batches` with batch c computed by rank c mod N (the rule of the Hessian chunks).

    Each batch runs the same code on the same rows as in one process, so its bits do not depend
    on which rank computed it. The rows reach every rank through the shared files of `store`
    (each rank writes its batches, then a barrier) or, without a shared store, are sent from the
    batch's rank to the others. Rank 0 computes batch 0 and tells the others the output's row
    shape and dtype, so every rank allocates the same tensor (the same shared file)."""
    world = dist.world()
    chunks = x.split(batch_size)
    owned = [c for c in range(len(chunks)) if world.owns(c)]
    first = fn(chunks[owned[0]].to(device)).to(x.device) if owned else None
    row, dtype = dist.broadcast_object((tuple(first.shape[1:]), first.dtype)
                                       if world.is_main else None)
    on_host = store is not None and x.device.type == "cpu"
    out = (store.empty((len(x), *row), dtype) if on_host else
           torch.empty((len(x), *row), dtype=dtype, device=x.device))
    for c in owned:
        y = first if c == owned[0] else fn(chunks[c].to(device)).to(x.device)
        out[c * batch_size:c * batch_size + len(y)] = y
    if on_host and store.shared:
        dist.barrier()  # every rank's rows are in the files
        return out
    for c in range(len(chunks)):  # (b, ...) rows of batch c, from the rank that computed them
        dist.broadcast_from(out[c * batch_size:(c + 1) * batch_size], c % world.size)
    return out
