"""Whole-block acceptance for `gsq refine`, a hook of the block loop (`calib.sequential.BlockHook`),
and the held-out block errors of the file and of the refined model.

A refined block is kept only if its output on held-out inputs (the test windows, else val) is
closer to the full-precision block's output than the file's assignment is; otherwise the block
goes back to the file's codes and scales before its outputs feed the next block.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from gsq.calib.capture import capture_block_context, capture_block_inputs
from gsq.calib.objectives import map_batches
from gsq.calib.sequential import BlockResult, Buffers
from gsq.quant.affine import AffineWeight
from gsq.refine.plan import Plan

log = logging.getLogger(__name__)


def _block_map(adapter, block: nn.Module, ctx: dict, x: Tensor, micro: int, device) -> Tensor:
    """`(N, T, hidden)` outputs of `block` as it is now for inputs `x` (same device as `x`)."""
    with torch.no_grad():
        return map_batches(lambda h: adapter.block_forward(block, h, ctx), x, micro, device)


def revert_block(plan: Plan, adapter, prefix: str, block: nn.Module) -> dict[str, AffineWeight]:
    """Write the file's values into the refined linears of `block` (HF module names `prefix` +
    name); returns their file records by full module name (encoded, they are the input bytes)."""
    records = {}
    for name, linear in plan.block(prefix).items():
        if not linear.refine:
            continue
        weight = adapter.weight(block, name)
        with torch.no_grad():
            weight.copy_(linear.values().to(weight.device, weight.dtype))
        records[linear.module] = linear.record()
    return records


def _same_as_file(plan: Plan, records: dict[str, AffineWeight]) -> bool:
    """True if every record has the file's codes and scales (nothing to revert)."""
    for module, record in records.items():
        init = plan.linears[module].record()
        if not (torch.equal(record.codes.cpu(), init.codes)
                and torch.equal(record.scale.float().cpu(), init.scale)):
            return False
    return True


def accept_block(plan: Plan, adapter, block: nn.Module, ctx: dict, prefix: str, x: Tensor,
                 fp_out: Tensor, records: dict, micro: int, device) -> tuple[dict, dict, Tensor]:
    """Keep a refined block only if its outputs on held-out inputs `x` `(N, T, hidden)` are closer
    (relative MSE) to the FP block's `fp_out` than those of the file's assignment.

    Returns (records to keep, acceptance entry, the kept block's outputs on `x`). A block that is
    not better is reverted in place (`revert_block`); one equal to the file is kept as it is.
    """
    out = _block_map(adapter, block, ctx, x, micro, device)
    file_values = {n: lin.values() for n, lin in plan.block(prefix).items() if lin.refine}
    with _swapped(adapter, block, file_values):
        file_out = _block_map(adapter, block, ctx, x, micro, device)
    entry = {"file_rel_mse": _rel_mse(file_out, fp_out), "refined_rel_mse": _rel_mse(out, fp_out),
             "reverted": False}
    if entry["refined_rel_mse"] >= entry["file_rel_mse"] and not _same_as_file(plan, records):
        records = revert_block(plan, adapter, prefix, block)
        out, entry["reverted"] = file_out, True
    return records, entry, out


class BlockAcceptance:
    """`BlockHook` of `run_quantization` (see the module doc): held-out inputs are the `test`
    windows `(M, T)` followed through the kept blocks, or the val buffer when M = 0. Reverted
    block indices collect in `reverted`; each block report gets an "acceptance" entry."""

    def __init__(self, plan: Plan, adapter, model: nn.Module, test: Tensor, micro: int,
                 device: torch.device) -> None:
        self.plan, self.adapter, self.model, self.test = plan, adapter, model, test
        self.micro, self.device = micro, device
        self.held: Tensor | None = None  # (M, T, hidden): the current block's held-out inputs
        self.reverted: list[int] = []

    def __call__(self, index: int, block: nn.Module, ctx: dict, bufs: Buffers,
                 quantize) -> BlockResult:
        adapter, micro, device = self.adapter, self.micro, self.device
        if index == 0 and len(self.test):  # the loop has put the embeddings on the device
            self.held = capture_block_inputs(self.model, adapter, self.test, device,
                                             micro).to(bufs.val.device)
        x = bufs.val if self.held is None else self.held
        fp_out = _block_map(adapter, block, ctx, x, micro, device)  # refined linears still FP
        records, report, next_bufs = quantize()
        records, entry, out = accept_block(self.plan, adapter, block, ctx,
                                           adapter.first_block_prefix().format(i=index), x,
                                           fp_out, records, micro, device)
        if entry["reverted"]:
            next_bufs = Buffers(*(_block_map(adapter, block, ctx, b, micro, device)
                                  for _, b in bufs.items()))
            self.reverted.append(index)
            log.info("block %d: reverted to the file's codes (held-out rel. MSE %.4g, file %.4g)",
                     index, entry["refined_rel_mse"], entry["file_rel_mse"])
        if self.held is not None:
            self.held = out
        inputs = "val" if self.held is None else "test"
        return records, {**report, "acceptance": {"inputs": inputs, **entry}}, next_bufs


# --------------------------------------------------------------------------------------------
# Held-out block errors: the file vs the refined model, against the full-precision model


@contextmanager
def _swapped(adapter, block: nn.Module, values: dict[str, Tensor]) -> Iterator[None]:
    """Weights of `block`'s linears temporarily overwritten by `values` (by linear name), through
    the adapter's live weights (an MoE expert's is a slice of a fused parameter)."""
    saved = {name: adapter.weight(block, name).detach().clone() for name in values}
    try:
        with torch.no_grad():
            for name, value in values.items():
                weight = adapter.weight(block, name)
                weight.copy_(value.to(weight.device, weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                weight = adapter.weight(block, name)
                weight.copy_(value.to(weight.device))


@torch.no_grad()
def block_outputs(model: nn.Module, adapter, ids: Tensor, n_blocks: int, device: torch.device,
                  micro: int, swap=None) -> Iterator[Tensor]:
    """Hidden states after each of the first `n_blocks` blocks for windows `ids` `(N, T)`, each
    `(N, T, hidden)` on the host, one block at a time (modules visit `device` and come back).
    swap(i) -> {linear name: weight} replaces block i's linears while it runs."""
    embeds = adapter.embedding_modules(model)
    for module in embeds:
        module.to(device)
    try:
        ctx = capture_block_context(model, adapter, ids.shape[1], device)
        h = capture_block_inputs(model, adapter, ids, device, micro).cpu()
    finally:
        for module in embeds:
            module.to("cpu")
    for i, block in enumerate(list(adapter.blocks(model))[:n_blocks]):
        with _swapped(adapter, block, swap(i) if swap else {}):
            block.to(device)
            h = map_batches(lambda x, b=block: adapter.block_forward(b, x, ctx), h, micro, device)
            block.to("cpu")
        yield h


def _rel_mse(x: Tensor, ref: Tensor) -> float:
    return float(((x - ref).double() ** 2).mean()) / (float((ref.double() ** 2).mean()) or 1.0)


class HeldOut:
    """Block outputs on held-out windows: the FP model's are kept (one `(N, T, hidden)` tensor a
    block), the input file's and the refined model's are compared with them as they come."""

    def __init__(self, model, adapter, ids: Tensor, n_blocks: int, device, micro: int) -> None:
        self.args = (model, adapter, ids, n_blocks, device, micro)
        self.full = list(block_outputs(*self.args))  # run before the file values are loaded

    def errors(self, swap=None) -> list[float]:
        """Relative MSE against the FP outputs, per block, of the model as it is now (with
        `swap`, see `block_outputs`)."""
        return [_rel_mse(h, f) for h, f in zip(block_outputs(*self.args, swap=swap), self.full,
                                               strict=True)]


def file_swap(plan: Plan, adapter):
    """swap(i) for `block_outputs`: block i's linears as the input file has them."""
    def swap(i: int) -> dict[str, Tensor]:
        prefix = adapter.first_block_prefix().format(i=i)
        return {name: x.values() for name, x in plan.block(prefix).items()}
    return swap
