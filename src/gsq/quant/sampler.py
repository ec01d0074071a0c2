"""Gumbel-Softmax samplers with closed-form backward and noise replay (method §4, §4.1).

Forward returns the soft weight W_soft = s · Σ_k p_k v_k (categorical) or s · m · b (ternary).
Only logits, scales, candidate values and the noise seed are saved; the probabilities `(K, out, in)`
are recomputed in the backward from the replayed noise. Softmax and noise are fp32 (float64 when the
logits are float64, for gradient tests). Scales are cast to `scale_dtype` (bf16 by default, the
storage precision) in the forward; the cast is treated as the identity in the backward.

Worked example (2-bit, init code q = 0, α = 6): α·c̃ = [-7.5, 1.5, 4.5, 1.5] for v = [-2, -1, 0, 1];
with σ_init = 0.01, no noise, κ = 100, τ = 2: p ≈ [0.002, 0.154, 0.690, 0.154].
"""

from __future__ import annotations

import torch
from torch import Tensor

from gsq.kernels import use_fused
from gsq.quant.grids import expand_scale
from gsq.quant.noise import gumbel_from_uniform, logistic_from_uniform, seeded_uniform


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _scale_for_forward(scale: Tensor, scale_dtype: torch.dtype | None,
                       dtype: torch.dtype) -> Tensor:
    s = scale if scale_dtype is None else scale.to(scale_dtype)
    return s.to(dtype)


def _group_sum(x: Tensor, group_size: int) -> Tensor:
    """`(out, in)` -> `(out, in // g)`: sum over each group's columns."""
    out, cols = x.shape
    return x.reshape(out, cols // group_size, group_size).sum(dim=-1)


def categorical_probs(
    logits: Tensor, valid: Tensor | None, kappa: float, tau: float, noise_seed: int | None
) -> Tensor:
    """p = softmax_k((κ·ℓ_k + g_k) / τ) over axis 0; no noise when `noise_seed` is None."""
    dtype = _compute_dtype(logits)
    z = logits.to(dtype) * kappa
    if noise_seed is not None:
        u = seeded_uniform(tuple(logits.shape), noise_seed, logits.device)
        z = z + gumbel_from_uniform(u).to(dtype)
    z = z / tau
    if valid is not None:
        z = z.masked_fill(~valid, float("-inf"))
    return torch.softmax(z, dim=0)


class CategoricalSample(torch.autograd.Function):
    """W_soft = s · Σ_k p_k v_k with logits `(K, out, in)`, scale `(out, in/g)`,
    values `(K, out|1, in|1)`."""

    @staticmethod
    def forward(ctx, logits, scale, values, valid, kappa, tau, noise_seed, group_size, scale_dtype,
                out_dtype):  # noqa: D102
        dtype = _compute_dtype(logits)
        p = categorical_probs(logits, valid, kappa, tau, noise_seed)
        code = (p * values.to(dtype)).sum(dim=0)  # (out, in) soft code
        s = expand_scale(_scale_for_forward(scale, scale_dtype, dtype), group_size)
        ctx.save_for_backward(logits, scale, values, valid)
        ctx.cfg = (kappa, tau, noise_seed, group_size, scale_dtype)
        return (s * code).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_w):  # noqa: D102
        logits, scale, values, valid = ctx.saved_tensors
        kappa, tau, noise_seed, group_size, scale_dtype = ctx.cfg
        dtype = _compute_dtype(logits)
        p = categorical_probs(logits, valid, kappa, tau, noise_seed)  # replayed noise
        v = values.to(dtype)
        code = (p * v).sum(dim=0)
        G = grad_w.to(dtype)
        grad_scale = _group_sum(G * code, group_size).to(scale.dtype)
        h = G * expand_scale(_scale_for_forward(scale, scale_dtype, dtype), group_size)
        # ∂L/∂ℓ_k = (κ/τ) p_k (h v_k - Σ_j p_j h v_j) = (κ/τ) p_k h (v_k - code)
        grad_logits = (kappa / tau) * p * h * (v - code)
        return (grad_logits.to(logits.dtype), grad_scale,
                None, None, None, None, None, None, None, None)


def ternary_probs(logits: Tensor, kappa: float, tau: float,
                  noise_seed: int | None) -> tuple[Tensor, Tensor]:
    """Mask m = σ((2κℓ_m + n_m)/τ) and sign b = 2σ((2κℓ_b + n_b)/τ) - 1
    from logits `(2, out, in)`."""
    dtype = _compute_dtype(logits)
    z = 2.0 * kappa * logits.to(dtype)
    if noise_seed is not None:
        u = seeded_uniform(tuple(logits.shape), noise_seed, logits.device)
        z = z + logistic_from_uniform(u).to(dtype)
    sig = torch.sigmoid(z / tau)
    return sig[0], 2.0 * sig[1] - 1.0


class TernarySample(torch.autograd.Function):
    """W_soft = s · m · b with mask and sign logits `(2, out, in)` (method §4 binary case)."""

    @staticmethod
    def forward(ctx, logits, scale, kappa, tau, noise_seed, group_size, scale_dtype, out_dtype):  # noqa: D102
        dtype = _compute_dtype(logits)
        m, b = ternary_probs(logits, kappa, tau, noise_seed)
        s = expand_scale(_scale_for_forward(scale, scale_dtype, dtype), group_size)
        ctx.save_for_backward(logits, scale)
        ctx.cfg = (kappa, tau, noise_seed, group_size, scale_dtype)
        return (s * m * b).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_w):  # noqa: D102
        logits, scale = ctx.saved_tensors
        kappa, tau, noise_seed, group_size, scale_dtype = ctx.cfg
        dtype = _compute_dtype(logits)
        m, b = ternary_probs(logits, kappa, tau, noise_seed)
        G = grad_w.to(dtype)
        grad_scale = _group_sum(G * m * b, group_size).to(scale.dtype)
        h = G * expand_scale(_scale_for_forward(scale, scale_dtype, dtype), group_size)
        grad_mask = h * b * m * (1.0 - m) * (2.0 * kappa / tau)
        grad_sign = h * m * (1.0 + b) * (1.0 - b) * (kappa / tau)
        grad_logits = torch.stack([grad_mask, grad_sign]).to(logits.dtype)
        return grad_logits, grad_scale, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Dispatch: the fused Triton kernels on CUDA when enabled (`gsq.kernels.use_fused`), else torch


def categorical_sample(logits, scale, values, valid, kappa, tau, noise_seed, group_size,
                       scale_dtype, out_dtype, accumulate_grad: bool = False) -> Tensor:
    """`CategoricalSample.apply(...)`, fused on CUDA (see `use_fused`). `accumulate_grad` (fused
    path only): True adds ∂ℓ straight into `logits.grad`; a `sampler_triton.DeferredGrads`
    batches several micro-steps (see the `sampler_triton` module doc)."""
    if use_fused(logits):
        from gsq.kernels.sampler_triton import FusedCategoricalSample

        return FusedCategoricalSample.apply(logits, scale, values, valid, kappa, tau, noise_seed,
                                            group_size, scale_dtype, out_dtype, accumulate_grad)
    return CategoricalSample.apply(logits, scale, values, valid, kappa, tau, noise_seed,
                                   group_size, scale_dtype, out_dtype)


def ternary_sample(logits, scale, kappa, tau, noise_seed, group_size, scale_dtype, out_dtype,
                   accumulate_grad: bool = False) -> Tensor:
    """`TernarySample.apply(...)`, fused on CUDA (see `use_fused` and `categorical_sample`)."""
    if use_fused(logits):
        from gsq.kernels.sampler_triton import FusedTernarySample

        return FusedTernarySample.apply(logits, scale, kappa, tau, noise_seed, group_size,
                                        scale_dtype, out_dtype, accumulate_grad)
    return TernarySample.apply(logits, scale, kappa, tau, noise_seed, group_size, scale_dtype,
                               out_dtype)
