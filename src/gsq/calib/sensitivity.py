"""Sensitivity of each linear to its bit width, measured before the block loop (`--bpw`).

One pass over the full-precision model, block by block through the same `BlockLoader` as the
block loop (so it streams from disk where the loop does): for each block, its output `y` on a few
calibration windows; then, for each unit (a linear, or one projection of all routed experts of a
MoE layer, which engines store as one merged tensor and so must share a width) and each candidate
width `b`, the unit alone is round-to-nearest quantized at `b` and the block run again:

    err(unit, b) = mean((y_b - y)^2) / mean(y^2)

the relative perturbation of the residual stream that leaves the block. Every block output is
read through an RMSNorm downstream, so a relative error is what the rest of the model sees, and
the errors of different blocks add up on one scale. The windows then move on through the
full-precision block. `gsq.quant.allocate` turns the numbers into widths.
"""

from __future__ import annotations

import os.path
import time

import torch
from torch import Tensor, nn

from gsq import dist
from gsq.calib.capture import capture_block_context, capture_block_inputs
from gsq.calib.objectives import map_batches
from gsq.calib.sequential import BlockLoader, active_stages
from gsq.config import QuantizeConfig
from gsq.errors import GSQError
from gsq.models.base import ModelAdapter
from gsq.quant.allocate import LinearChoice, allocate_bits
from gsq.quant.rtn import rtn_quantize
from gsq.quant.types import QuantSpec

BPW_WIDTHS = (2, 3, 4)  # candidate widths of `--bpw`
SENSITIVITY_WINDOWS = 8  # training windows the measurement runs on (the first ones)


def block_units(adapter: ModelAdapter, block: nn.Module, cfg: QuantizeConfig,
                prefix: str) -> dict[str, list[str]]:
    """Allocation units of a block: fnmatch pattern of full names -> the block's linear names.

    A dense linear is its own unit (pattern = its full name); the i-th projection of every routed
    expert forms one unit, e.g. "model.layers.3.mlp.experts.*.gate_proj". Skipped linears are
    left out."""
    names = [n for s in active_stages(adapter, cfg, block) for n in s.linears
             if cfg.spec_for(prefix + n) is not None]
    experts = adapter.experts(block)
    routed = {n for linears in experts.values() for n in linears}
    units = {prefix + n: [n] for n in names if n not in routed}
    for part in zip(*experts.values(), strict=True):  # one projection of every expert
        part = [n for n in part if n in names]
        if part:
            units[prefix + _wildcard(part)] = part
    return units


def _wildcard(names: list[str]) -> str:
    """"mlp.experts.*.gate_proj" for "mlp.experts.0.gate_proj", "mlp.experts.1.gate_proj", ..."""
    if len(names) == 1:
        return names[0]
    head = os.path.commonprefix(names)
    tail = os.path.commonprefix([n[::-1] for n in names])[::-1]
    return head + "*" + tail


@torch.no_grad()
def _block_errors(block: nn.Module, adapter: ModelAdapter, units: dict[str, list[str]],
                  x: Tensor, ctx: dict, cfg: QuantizeConfig, widths: tuple[int, ...],
                  device: torch.device) -> tuple[dict[str, dict[int, float]], Tensor]:
    """err per unit and width for block inputs `x` `(N, T, hidden)`; also the FP outputs."""
    micro = cfg.train.micro_batch_size

    def run(h):
        return adapter.block_forward(block, h, ctx)

    y = map_batches(run, x, micro, device)
    energy = float((y.float() ** 2).mean())
    errs: dict[str, dict[int, float]] = {}
    for pattern, names in units.items():
        originals = {n: adapter.weight(block, n).detach().clone() for n in names}
        errs[pattern] = {}
        for bits in widths:
            for n, W in originals.items():
                qw = rtn_quantize(W, QuantSpec(bits, cfg.group_size))
                adapter.weight(block, n).copy_(qw.dequantize(W.dtype).to(W.device))
            y_b = map_batches(run, x, micro, device)
            errs[pattern][bits] = float(((y_b.float() - y.float()) ** 2).mean()) / energy
        for n, W in originals.items():
            adapter.weight(block, n).copy_(W)
    return errs, y


def measure_sensitivity(model: nn.Module, adapter: ModelAdapter, windows: Tensor,
                        cfg: QuantizeConfig, device: torch.device,
                        loader: BlockLoader | None = None, widths: tuple[int, ...] = BPW_WIDTHS,
                        progress: bool = True) -> list[LinearChoice]:
    """One `LinearChoice` per unit of the blocks the run quantizes, on token windows `(N, T)`."""
    from tqdm.auto import tqdm

    loader = loader or BlockLoader()
    blocks = adapter.blocks(model)
    n_blocks = min(len(blocks), cfg.max_blocks or len(blocks))
    loader.load_embeddings(model, adapter, device)
    ctx = capture_block_context(model, adapter, windows.shape[1], device)
    x = capture_block_inputs(model, adapter, windows, device, cfg.train.micro_batch_size)
    loader.release_embeddings(model, adapter)
    choices = []
    for index in tqdm(range(n_blocks), desc="sensitivity", unit="block", disable=not progress):
        block = blocks[index]
        loader.load(index, block, device)
        prefix = adapter.first_block_prefix().format(i=index)
        units = block_units(adapter, block, cfg, prefix)
        errs, x = _block_errors(block, adapter, units, x, ctx, cfg, widths, device)
        for pattern, names in units.items():
            numel = sum(adapter.weight(block, n).numel() for n in names)
            bpp = {b: QuantSpec(b, cfg.group_size).bpp for b in widths}
            choices.append(LinearChoice(pattern, numel, bpp, errs[pattern]))
        loader.release(index, block)
    return choices


def allocate_widths(model: nn.Module, adapter: ModelAdapter, windows: dict[str, Tensor],
                    cfg: QuantizeConfig, device: torch.device,
                    loader: BlockLoader | None = None,
                    progress: bool = True) -> tuple[QuantizeConfig, dict]:
    """`cfg` with `cfg.bpw` resolved into per-unit bit widths (`bits_overrides`, exact names or
    expert patterns), and the allocation's report entry. Deterministic: RTN and fixed windows, so
    a resumed run allocates the same widths again. Under several processes every rank measures
    and rank 0's allocation is used by all (the same widths even where kernels differ)."""
    t0 = time.perf_counter()
    sample = windows["train"][:SENSITIVITY_WINDOWS]
    choices = measure_sensitivity(model, adapter, sample, cfg, device, loader, progress=progress)
    try:
        alloc = allocate_bits(choices, cfg.bpw)
    except ValueError as err:
        raise GSQError(str(err)) from err
    report = {"target_bpw": cfg.bpw, "achieved_bpw": alloc.achieved_bpw,
              "widths": alloc.widths, "sensitivity": {c.name: c.err for c in choices},
              "windows": len(sample), "seconds": round(time.perf_counter() - t0, 3)}
    return dist.broadcast_object(
        (cfg.replace(bpw=None, bits_overrides=tuple(alloc.widths.items())), report))
