"""Optional fused GPU kernels (Triton) for the GSQ sampler; the torch path stays the reference.

`use_fused(t)` says whether the fused path applies to tensor `t`: CUDA, fp32/bf16/fp16, triton
importable and env `GSQ_FUSED` = "1". The fused path is opt-in: its GPU equivalence tests pass on
an H100 and `benchmarks/gpu_step.py` measured it 5.6x faster than the torch sampler, but whether
it (and bf16) gives as good a model at equal budget is not settled yet. The samplers of
`gsq.quant.sampler` (`categorical_sample`, `ternary_sample`) dispatch on `use_fused(logits)`; this
package imports nothing of gsq (the kernels sit below `gsq.quant`).
Importing this package never imports triton; `gsq.kernels.sampler_triton` does.

The fused and torch paths draw different noise streams (Philox in-kernel vs a seeded
`torch.Generator`), so a run reproduces per path, not across paths.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton imports (and with it the kernel module)."""
    try:
        import gsq.kernels.sampler_triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no fused path"
        return False
    return True


def use_fused(tensor: Tensor) -> bool:
    """Fused kernels for `tensor`'s sampler? CUDA, a supported logit dtype, triton importable
    and `GSQ_FUSED` = "1" (opt-in, see the module doc; the CPU path and float64 gradient tests
    always use torch)."""
    if os.environ.get("GSQ_FUSED", "0") != "1":
        return False
    if not tensor.is_cuda or tensor.dtype not in _FUSED_DTYPES:
        return False
    return triton_available()


def lion_uses_triton(params) -> bool:
    """Whether to build `lion_pytorch.Lion(..., use_triton=True)`: every parameter on CUDA and the
    fused path enabled (lion_pytorch's Triton update asserts CUDA tensors)."""
    params = list(params)
    return bool(params) and all(use_fused(p) for p in params)


__all__ = ["lion_uses_triton", "triton_available", "use_fused"]
