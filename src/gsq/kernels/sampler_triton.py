"""Fused Triton kernels for the Gumbel-Softmax samplers (method §4, §4.1, §18.1 option B).

Same call signature and maths as `gsq.quant.sampler.CategoricalSample` / `TernarySample`, which
stay the reference and the CPU path. One forward kernel reads the logits once, draws the noise
in-kernel and writes the soft weight in the model dtype; one backward kernel regenerates the same
noise and writes the logit gradient and the per-group scale gradient in the same pass. Nothing of
size `(K, out, in)` is kept between forward and backward.

Noise (counter-based, §18.1 option B). Philox-4x32-10 (`tl.rand4x`; `PHILOX_ROUNDS`) keyed by
the 63-bit `noise_seed` (the full 64-bit Philox key: low and high words) with counter
`j · N + r · in + c` for weight `(r, c)`, `N = out · in`, and block `j = k // 4`; output `k % 4`
of that call is the uniform of candidate `k`. So one Philox call serves 4 candidates (2-bit grid:
1 call per weight, 3/4-bit shift: 2, ternary: 1). Uniforms are clamped to [1e-7, 1 - 1e-7] like
`noise.py`. The stream differs from the torch path's `torch.Generator` stream; runs reproduce per
path. `triton_uniform` materialises exactly these uniforms, so the torch reference can be fed the
same noise in tests.

Arithmetic. Compiled for sm_90, the 2-bit kernels take about 280 (forward) and 310 (backward)
SASS instructions per weight, mostly Philox and logs: about 2 ms per pass over the 218M weights
of a Llama-8B layer on an H100 (estimate), the same order as their memory time. So: the Gumbel's
outer log and the ternary's logistic logs use one MUFU `lg2.approx`
(absolute error ~1e-7, where only absolute accuracy matters; `GSQ_FUSED_FAST_LOG=0` turns it
off); the inner log of g = -ln(-ln u) stays `tl.log` (relative accuracy for u near 1); exp is
triton's `ex2.approx`; 1/τ is multiplied; normalisers use `tl.fdiv(ieee_rounding=False)`. The
interpreter runs plain `tl.log`. Differences to the torch path stay at fp32 round-off.

Tiling. A program owns `BLOCK_R` rows of one scale group and walks the group in chunks of
`BLOCK_C` columns; the scale gradient of its groups is summed in registers in a fixed order
(deterministic, no atomics). Indices are int32 unless `ceil(K/4) · N` needs int64.

Optional fused gradient accumulation (`accumulate_grad=True`): the backward adds the logit
gradient straight into `logits.grad` (allocating it when None) and returns None for the logits,
which saves the separate read-add-write of autograd's accumulation (2 × K × 4 bytes per weight
and micro-batch with fp32 logits). Only for a leaf `logits` used once per graph, with
`loss.backward()` (not `torch.autograd.grad`); falls back to the plain return otherwise.
`accumulate_grad=DeferredGrads(n)` goes further: micro-steps only queue their weight gradient
and one backward pass per n micro-steps reads the logits and writes `.grad` once (class doc);
`accumulate_grad=True` uses a process-wide one when env `GSQ_FUSED_DEFER` > 1.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

UNIFORM_EPS = 1e-7  # same clamp as gsq.quant.noise.UNIFORM_EPS
MAX_SEED = 1 << 63
MAX_CANDIDATES = 5
# Elements per program tile and warps per program (4 elements a thread keeps the backward near
# 64 registers at K = 4, compiled for sm_90); overridable for tuning on the device.
TILE_ELEMS = int(os.environ.get("GSQ_FUSED_TILE", "512"))
NUM_WARPS = int(os.environ.get("GSQ_FUSED_WARPS", "4"))
MAX_BLOCK_C = 128
# The interpreter (TRITON_INTERPRET=1, read by triton when the kernels are decorated) runs no PTX.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
FAST_LOG_ENABLED = os.environ.get("GSQ_FUSED_FAST_LOG", "1") != "0"
# Philox rounds: 10 is tl.rand's default and Random123's recommendation (7 already passes
# BigCrush, ~9% fewer instructions here). Part of the noise stream's identity: changing it changes
# the noise, so keep it fixed within a run.
PHILOX_ROUNDS = int(os.environ.get("GSQ_FUSED_PHILOX_ROUNDS", "10"))


# --------------------------------------------------------------------------------------------
# Triton device functions
# --------------------------------------------------------------------------------------------


@triton.jit
def _uniform4(seed, counter, N_ROUNDS: tl.constexpr):
    """Four clamped fp32 uniforms per counter from one Philox-4x32 call (N_ROUNDS rounds)."""
    u0, u1, u2, u3 = tl.rand4x(seed, counter, N_ROUNDS)
    lo = 1e-7
    hi = 1.0 - 1e-7
    u0 = tl.minimum(tl.maximum(u0, lo), hi)
    u1 = tl.minimum(tl.maximum(u1, lo), hi)
    u2 = tl.minimum(tl.maximum(u2, lo), hi)
    u3 = tl.minimum(tl.maximum(u3, lo), hi)
    return u0, u1, u2, u3


@triton.jit
def _log_abs(x, FAST_LOG: tl.constexpr):
    """ln x to an *absolute* error of ~1e-7 (enough where the log is added, not where its
    relative accuracy matters): one MUFU `lg2.approx` on CUDA, `tl.log` elsewhere."""
    if FAST_LOG:
        y = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                      is_pure=True, pack=1) * 0.6931471805599453
    else:
        y = tl.log(x)
    return y


@triton.jit
def _tile_index(pid_r, gid, c0, n_rows, n_cols, group_size,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
                EVEN_C: tl.constexpr):
    """Flat weight index `r · in + c` `(BLOCK_R, BLOCK_C)` of one chunk, and its mask.

    EVEN_C (BLOCK_C divides the group): the mask is constant along a row, so loads vectorise."""
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cin = c0 + tl.arange(0, BLOCK_C)
    if EVEN_C:
        mask = (rows < n_rows)[:, None] & (cin < BLOCK_C)[None, :]
    else:
        mask = (rows < n_rows)[:, None] & (cin < group_size)[None, :]
    cols = gid * group_size + cin
    if WIDE:
        idx = rows.to(tl.int64)[:, None] * n_cols + cols.to(tl.int64)[None, :]
    else:
        idx = rows[:, None] * n_cols + cols[None, :]
    return idx, mask


@triton.jit
def _candidate(logits_ptr, values_ptr, valid_ptr, k, n_w, idx, mask, u, kappa, inv_tau,
               HAS_NOISE: tl.constexpr, HAS_VALID: tl.constexpr, PER_WEIGHT: tl.constexpr,
               FAST_LOG: tl.constexpr):
    """z_k = (κ·ℓ_k + g_k) / τ (−inf where masked) and the candidate value v_k, both fp32.

    v_k is a scalar for shared values `(K,)` and a tile for per-weight values `(K, out, in)`."""
    off = k * n_w + idx
    z = tl.load(logits_ptr + off, mask=mask, other=0.0).to(tl.float32) * kappa
    if HAS_NOISE:
        # g = -ln(L), L = -ln(u): L needs relative accuracy (u near 1), the outer log only
        # absolute accuracy, so only the outer one may use the fast MUFU log.
        z = z - _log_abs(-tl.log(u), FAST_LOG)
    z = z * inv_tau
    if HAS_VALID:
        ok = tl.load(valid_ptr + off, mask=mask, other=1)
        z = tl.where(ok != 0, z, float("-inf"))
    if PER_WEIGHT:
        v = tl.load(values_ptr + off, mask=mask, other=0).to(tl.float32)
    else:
        v = tl.load(values_ptr + k).to(tl.float32)
    return z, v


@triton.jit
def _categorical_tile(logits_ptr, values_ptr, valid_ptr, seed, n_w, idx, mask, kappa, inv_tau,
                      K: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_VALID: tl.constexpr,
                      PER_WEIGHT: tl.constexpr, FAST_LOG: tl.constexpr,
                      N_ROUNDS: tl.constexpr):
    """Probabilities p_0..p_4 (0 for k >= K), values v_0..v_4 and the soft code Σ p_k v_k."""
    u0 = tl.full(idx.shape, 0.5, tl.float32)
    u1 = u0
    u2 = u0
    u3 = u0
    u4 = u0
    if HAS_NOISE:
        u0, u1, u2, u3 = _uniform4(seed, idx, N_ROUNDS)
        if K > 4:
            u4, _, _, _ = _uniform4(seed, idx + n_w, N_ROUNDS)
    z0, v0 = _candidate(logits_ptr, values_ptr, valid_ptr, 0, n_w, idx, mask, u0, kappa, inv_tau,
                        HAS_NOISE, HAS_VALID, PER_WEIGHT, FAST_LOG)
    z1, v1 = _candidate(logits_ptr, values_ptr, valid_ptr, 1, n_w, idx, mask, u1, kappa, inv_tau,
                        HAS_NOISE, HAS_VALID, PER_WEIGHT, FAST_LOG)
    neg = tl.full(idx.shape, float("-inf"), tl.float32)
    zero = tl.zeros(idx.shape, tl.float32)
    z2 = neg
    z3 = neg
    z4 = neg
    v2 = zero
    v3 = zero
    v4 = zero
    if K > 2:
        z2, v2 = _candidate(logits_ptr, values_ptr, valid_ptr, 2, n_w, idx, mask, u2, kappa,
                            inv_tau, HAS_NOISE, HAS_VALID, PER_WEIGHT, FAST_LOG)
    if K > 3:
        z3, v3 = _candidate(logits_ptr, values_ptr, valid_ptr, 3, n_w, idx, mask, u3, kappa,
                            inv_tau, HAS_NOISE, HAS_VALID, PER_WEIGHT, FAST_LOG)
    if K > 4:
        z4, v4 = _candidate(logits_ptr, values_ptr, valid_ptr, 4, n_w, idx, mask, u4, kappa,
                            inv_tau, HAS_NOISE, HAS_VALID, PER_WEIGHT, FAST_LOG)
    zmax = tl.maximum(tl.maximum(tl.maximum(z0, z1), tl.maximum(z2, z3)), z4)
    e0 = tl.exp(z0 - zmax)
    e1 = tl.exp(z1 - zmax)
    e2 = zero  # unused slots cost no exp
    e3 = zero
    e4 = zero
    if K > 2:
        e2 = tl.exp(z2 - zmax)
    if K > 3:
        e3 = tl.exp(z3 - zmax)
    if K > 4:
        e4 = tl.exp(z4 - zmax)
    inv = tl.fdiv(1.0, e0 + e1 + e2 + e3 + e4, ieee_rounding=False)
    p0 = e0 * inv
    p1 = e1 * inv
    p2 = e2 * inv
    p3 = e3 * inv
    p4 = e4 * inv
    code = p0 * v0 + p1 * v1 + p2 * v2 + p3 * v3 + p4 * v4
    return p0, p1, p2, p3, p4, v0, v1, v2, v3, v4, code


@triton.jit
def _store_grad(grad_ptr, k, n_w, idx, mask, g, ACCUM: tl.constexpr):
    """Write (or add into, when ACCUM) the logit gradient of candidate k."""
    ptr = grad_ptr + k * n_w + idx
    if ACCUM:
        g = g + tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ternary_tile(logits_ptr, seed, n_w, idx, mask, kappa, inv_tau, HAS_NOISE: tl.constexpr,
                  FAST_LOG: tl.constexpr, N_ROUNDS: tl.constexpr):
    """Mask m = σ((2κℓ_m + n_m)/τ) and sign b = 2σ((2κℓ_b + n_b)/τ) − 1, logistic noise."""
    zm = tl.load(logits_ptr + idx, mask=mask, other=0.0).to(tl.float32) * (2.0 * kappa)
    zb = tl.load(logits_ptr + n_w + idx, mask=mask, other=0.0).to(tl.float32) * (2.0 * kappa)
    if HAS_NOISE:
        u0, u1, _, _ = _uniform4(seed, idx, N_ROUNDS)
        zm = zm + (_log_abs(u0, FAST_LOG) - _log_abs(1.0 - u0, FAST_LOG))
        zb = zb + (_log_abs(u1, FAST_LOG) - _log_abs(1.0 - u1, FAST_LOG))
    m = tl.fdiv(1.0, 1.0 + tl.exp(-(zm * inv_tau)), ieee_rounding=False)
    b = tl.fdiv(2.0, 1.0 + tl.exp(-(zb * inv_tau)), ieee_rounding=False) - 1.0
    return m, b


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _uniform_kernel(out_ptr, seed, n_w, K: tl.constexpr, BLOCK: tl.constexpr,
                    WIDE: tl.constexpr, N_ROUNDS: tl.constexpr):
    """u[k, i] for i < N: exactly the uniforms the sampler kernels draw (see module doc)."""
    pid = tl.program_id(0)
    if WIDE:
        n_w = n_w.to(tl.int64)
        idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_w
    for j in tl.static_range((K + 3) // 4):
        u0, u1, u2, u3 = _uniform4(seed, idx + j * n_w, N_ROUNDS)
        tl.store(out_ptr + (4 * j) * n_w + idx, u0, mask=mask)
        if 4 * j + 1 < K:
            tl.store(out_ptr + (4 * j + 1) * n_w + idx, u1, mask=mask)
        if 4 * j + 2 < K:
            tl.store(out_ptr + (4 * j + 2) * n_w + idx, u2, mask=mask)
        if 4 * j + 3 < K:
            tl.store(out_ptr + (4 * j + 3) * n_w + idx, u3, mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _categorical_fwd_kernel(
    logits_ptr, scale_ptr, values_ptr, valid_ptr, out_ptr,
    seed, n_rows, n_cols, n_w, group_size, n_groups, kappa, inv_tau,
    K: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_VALID: tl.constexpr, PER_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr, EVEN_C: tl.constexpr,
    N_CHUNKS: tl.constexpr, FAST_LOG: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    """W[r, c] = s[r, c // g] · Σ_k p_k v_k for BLOCK_R rows of scale group `program_id(1)`."""
    pid_r = tl.program_id(0)
    gid = tl.program_id(1)
    if WIDE:
        n_w = n_w.to(tl.int64)
    rows1 = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    s = tl.load(scale_ptr + rows1 * n_groups + gid, mask=rows1 < n_rows, other=0.0)
    for ci in range(N_CHUNKS):  # constexpr trip count: a plain loop, not unrolled
        c0 = ci * BLOCK_C
        idx, mask = _tile_index(pid_r, gid, c0, n_rows, n_cols, group_size, BLOCK_R, BLOCK_C,
                                WIDE, EVEN_C)
        p0, p1, p2, p3, p4, v0, v1, v2, v3, v4, code = _categorical_tile(
            logits_ptr, values_ptr, valid_ptr, seed, n_w, idx, mask, kappa, inv_tau,
            K, HAS_NOISE, HAS_VALID, PER_WEIGHT, FAST_LOG, N_ROUNDS)
        w = s[:, None] * code
        tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _batch_seed(seed, seeds_ptr, j, BATCHED: tl.constexpr):
    """Noise seed of batch entry j: the scalar `seed`, or seeds[j] for a deferred batch."""
    if BATCHED:  # noqa: SIM108 - a constexpr branch, not a value choice
        sj = tl.load(seeds_ptr + j)
    else:
        sj = seed
    return sj


@triton.jit(do_not_specialize=["seed"])
def _categorical_bwd_kernel(
    logits_ptr, scale_ptr, values_ptr, valid_ptr, gw_ptr, gl_ptr, gs_ptr, seeds_ptr,
    seed, n_rows, n_cols, n_w, group_size, n_groups, kappa, inv_tau, k_over_t,
    K: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_VALID: tl.constexpr, PER_WEIGHT: tl.constexpr,
    ACCUM: tl.constexpr, BATCHED: tl.constexpr, N_BATCH: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    WIDE: tl.constexpr, EVEN_C: tl.constexpr, N_CHUNKS: tl.constexpr, FAST_LOG: tl.constexpr,
    N_ROUNDS: tl.constexpr,
):
    """∂ℓ_k = (κ/τ)·p_k·h·(v_k − code), h = G·s; ∂s[r, grp] = Σ_{c∈grp} G·code (replayed noise).

    Summed over N_BATCH (G_j, seed_j) pairs (G `(N_BATCH, out, in)`; BATCHED: seeds from
    `seeds_ptr`, else the one `seed`) in registers, then one write (or add, ACCUM) of ∂ℓ.
    N_BATCH is a constexpr (a plain loop; 1 for the immediate path)."""
    pid_r = tl.program_id(0)
    gid = tl.program_id(1)
    if WIDE:
        n_w = n_w.to(tl.int64)
    rows1 = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows1 < n_rows
    s = tl.load(scale_ptr + rows1 * n_groups + gid, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for ci in range(N_CHUNKS):  # constexpr trip count: a plain loop, not unrolled
        c0 = ci * BLOCK_C
        idx, mask = _tile_index(pid_r, gid, c0, n_rows, n_cols, group_size, BLOCK_R, BLOCK_C,
                                WIDE, EVEN_C)
        gl0 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        gl1 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        gl2 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        gl3 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        gl4 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for j in range(N_BATCH):
            sj = _batch_seed(seed, seeds_ptr, j, BATCHED)
            p0, p1, p2, p3, p4, v0, v1, v2, v3, v4, code = _categorical_tile(
                logits_ptr, values_ptr, valid_ptr, sj, n_w, idx, mask, kappa, inv_tau,
                K, HAS_NOISE, HAS_VALID, PER_WEIGHT, FAST_LOG, N_ROUNDS)
            g = tl.load(gw_ptr + j * n_w + idx, mask=mask, other=0.0).to(tl.float32)
            acc += tl.where(mask, g * code, 0.0)
            hk = g * s[:, None] * k_over_t
            gl0 += hk * p0 * (v0 - code)
            gl1 += hk * p1 * (v1 - code)
            if K > 2:
                gl2 += hk * p2 * (v2 - code)
            if K > 3:
                gl3 += hk * p3 * (v3 - code)
            if K > 4:
                gl4 += hk * p4 * (v4 - code)
        _store_grad(gl_ptr, 0, n_w, idx, mask, gl0, ACCUM)
        _store_grad(gl_ptr, 1, n_w, idx, mask, gl1, ACCUM)
        if K > 2:
            _store_grad(gl_ptr, 2, n_w, idx, mask, gl2, ACCUM)
        if K > 3:
            _store_grad(gl_ptr, 3, n_w, idx, mask, gl3, ACCUM)
        if K > 4:
            _store_grad(gl_ptr, 4, n_w, idx, mask, gl4, ACCUM)
    tl.store(gs_ptr + rows1 * n_groups + gid, tl.sum(acc, axis=1), mask=rmask)


@triton.jit(do_not_specialize=["seed"])
def _ternary_fwd_kernel(
    logits_ptr, scale_ptr, out_ptr, seed, n_rows, n_cols, n_w, group_size, n_groups, kappa,
    inv_tau,
    HAS_NOISE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
    EVEN_C: tl.constexpr, N_CHUNKS: tl.constexpr, FAST_LOG: tl.constexpr,
    N_ROUNDS: tl.constexpr,
):
    """W = s · m · b for BLOCK_R rows of scale group `program_id(1)`."""
    pid_r = tl.program_id(0)
    gid = tl.program_id(1)
    if WIDE:
        n_w = n_w.to(tl.int64)
    rows1 = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    s = tl.load(scale_ptr + rows1 * n_groups + gid, mask=rows1 < n_rows, other=0.0)
    for ci in range(N_CHUNKS):  # constexpr trip count: a plain loop, not unrolled
        c0 = ci * BLOCK_C
        idx, mask = _tile_index(pid_r, gid, c0, n_rows, n_cols, group_size, BLOCK_R, BLOCK_C,
                                WIDE, EVEN_C)
        m, b = _ternary_tile(logits_ptr, seed, n_w, idx, mask, kappa, inv_tau, HAS_NOISE,
                             FAST_LOG, N_ROUNDS)
        w = s[:, None] * m * b
        tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _ternary_bwd_kernel(
    logits_ptr, scale_ptr, gw_ptr, gl_ptr, gs_ptr, seeds_ptr, seed, n_rows, n_cols, n_w,
    group_size, n_groups, kappa, inv_tau, k_over_t,
    HAS_NOISE: tl.constexpr, ACCUM: tl.constexpr, BATCHED: tl.constexpr, N_BATCH: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr, EVEN_C: tl.constexpr,
    N_CHUNKS: tl.constexpr, FAST_LOG: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    """∂ℓ_m = h·b·m(1−m)·2κ/τ, ∂ℓ_b = h·m·(1+b)(1−b)·κ/τ, ∂s = Σ_group G·m·b; h = G·s
    (summed over a batch like `_categorical_bwd_kernel`)."""
    pid_r = tl.program_id(0)
    gid = tl.program_id(1)
    if WIDE:
        n_w = n_w.to(tl.int64)
    rows1 = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows1 < n_rows
    s = tl.load(scale_ptr + rows1 * n_groups + gid, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for ci in range(N_CHUNKS):  # constexpr trip count: a plain loop, not unrolled
        c0 = ci * BLOCK_C
        idx, mask = _tile_index(pid_r, gid, c0, n_rows, n_cols, group_size, BLOCK_R, BLOCK_C,
                                WIDE, EVEN_C)
        gm = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        gb = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for j in range(N_BATCH):
            sj = _batch_seed(seed, seeds_ptr, j, BATCHED)
            m, b = _ternary_tile(logits_ptr, sj, n_w, idx, mask, kappa, inv_tau, HAS_NOISE,
                                 FAST_LOG, N_ROUNDS)
            g = tl.load(gw_ptr + j * n_w + idx, mask=mask, other=0.0).to(tl.float32)
            acc += tl.where(mask, g * m * b, 0.0)
            hk = g * s[:, None] * k_over_t
            gm += hk * b * m * (1.0 - m) * 2.0
            gb += hk * m * (1.0 + b) * (1.0 - b)
        _store_grad(gl_ptr, 0, n_w, idx, mask, gm, ACCUM)
        _store_grad(gl_ptr, 1, n_w, idx, mask, gb, ACCUM)
    tl.store(gs_ptr + rows1 * n_groups + gid, tl.sum(acc, axis=1), mask=rmask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def _check_seed(noise_seed: int | None) -> int:
    """The seed as the kernels' Philox key: any int in [0, 2^63) (64-bit key, high bit 0)."""
    if noise_seed is None:
        return 0
    seed = int(noise_seed)
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"noise_seed must be in [0, 2^63); got {noise_seed}")
    return seed


def _fast_log(t: Tensor) -> bool:
    """MUFU logs (inline PTX) only when compiling for CUDA: not in the interpreter."""
    return t.is_cuda and not INTERPRET and FAST_LOG_ENABLED


def _on_device(t: Tensor):
    """Launch on `t`'s GPU (triton launches on the current device), a no-op on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _wide(k: int, n_w: int) -> bool:
    """int64 indices when the largest counter or logit offset does not fit int32."""
    return max(k, 4 * ((k + 3) // 4)) * n_w >= 2**31


def _blocks(group_size: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): chunks of up to 128 group columns, ~TILE_ELEMS elements a tile."""
    block_c = min(triton.next_power_of_2(group_size), MAX_BLOCK_C)
    block_r = max(1, min(64, TILE_ELEMS // block_c))
    return block_r, block_c


def _geometry(logits: Tensor, scale: Tensor, group_size: int):
    """(K, out, in, n_groups) after checking shapes (logits `(K, out, in)`, scale `(out, in/g)`)."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be (K, out, in); got {tuple(logits.shape)}")
    k, rows, cols = logits.shape
    if cols % group_size != 0 or tuple(scale.shape) != (rows, cols // group_size):
        raise ValueError(f"scale {tuple(scale.shape)} does not match logits {tuple(logits.shape)}"
                         f" with group size {group_size}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"fused sampler supports fp32/bf16/fp16 logits; got {logits.dtype}")
    return k, rows, cols, cols // group_size


def _effective_scale(scale: Tensor, scale_dtype: torch.dtype | None) -> Tensor:
    """The forward's scale: cast to its storage dtype, then fp32 `(out, n_groups)` (tiny)."""
    s = scale.detach()
    if scale_dtype is not None:
        s = s.to(scale_dtype)
    return s.to(torch.float32).contiguous()


def _grid(rows: int, n_groups: int, block_r: int) -> tuple[int, int]:
    return (triton.cdiv(rows, block_r), n_groups)


def _values_arg(values: Tensor, k: int, rows: int, cols: int) -> tuple[Tensor, bool]:
    """(values, per-weight?): shared `(K,)` when every weight has the same K values (2-bit grid
    `(K, 1, 1)`), else contiguous `(K, out, in)` (3/4-bit shift codes, int8, no copy)."""
    values = values.detach()
    if values.numel() == k:
        return values.reshape(k).contiguous(), False
    return values.expand(k, rows, cols).contiguous(), True


def triton_uniform(shape: tuple[int, ...], seed: int, device: torch.device | str) -> Tensor:
    """fp32 `shape = (K, ...)` uniforms in [1e-7, 1 - 1e-7]: the sampler kernels' noise for
    logits of this shape and `seed` (u[k] is the uniform of candidate k)."""
    shape = tuple(int(d) for d in shape)
    k = shape[0]
    n_w = 1
    for d in shape[1:]:
        n_w *= d
    out = torch.empty(shape, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    block = 1024
    with _on_device(out):
        _uniform_kernel[(triton.cdiv(n_w, block),)](out, _check_seed(seed), n_w, K=k,
                                                     BLOCK=block, WIDE=_wide(k, n_w),
                                                     N_ROUNDS=PHILOX_ROUNDS)
    return out


def _prepare_grad_target(logits: Tensor, accumulate: bool) -> tuple[Tensor, bool, bool]:
    """(buffer for ∂ℓ, add into it?, written into logits.grad?) for the backward kernels."""
    if accumulate and logits.is_leaf and logits.requires_grad:
        g = logits.grad
        if g is None:
            g = torch.empty_like(logits, memory_format=torch.contiguous_format)
            logits.grad = g
            return g, False, True
        if g.is_contiguous() and g.dtype == logits.dtype and not g.requires_grad:
            return g, True, True
    return torch.empty_like(logits, memory_format=torch.contiguous_format), False, False


class _Call(NamedTuple):
    """What the kernels need of one sampler call (tensors detached and contiguous)."""

    kind: str  # "categorical" | "ternary"
    logits: Tensor  # (K, out, in)
    s_eff: Tensor  # (out, n_groups) fp32: the forward's (storage-rounded) scale
    values: Tensor | None  # (K,) shared or (K, out, in) per weight; None for ternary
    valid_u8: Tensor | None  # (K, out, in) uint8 or None
    per_weight: bool
    kappa: float
    tau: float
    noise_seed: int | None
    group_size: int
    scale_dtype: torch.dtype  # dtype of the scale parameter, and of its gradient

    def batchable_with(self, other: _Call) -> bool:
        """Same sampler, settings and tensors except the noise seed: one deferred batch."""
        same = (self.kind, self.kappa, self.tau, self.noise_seed is None, self.group_size,
                self.logits.data_ptr(), self.s_eff.shape)
        return same == (other.kind, other.kappa, other.tau, other.noise_seed is None,
                        other.group_size, other.logits.data_ptr(), other.s_eff.shape)


class _Grad(NamedTuple):
    """A backward launch: G `(n_batch, out, in)`, the ∂ℓ buffer and whether to add into it."""

    grad_w: Tensor
    grad_l: Tensor
    accum: bool
    seeds: Tensor | None = None  # (n_batch,) int64 on the device: a deferred batch
    n_batch: int = 1


def _launch(call: _Call, out: Tensor | None = None, grad: _Grad | None = None) -> Tensor | None:
    """Forward kernel into `out`, or with `grad` the backward kernel; returns the fp32 scale
    gradient `(out, n_groups)` of the backward."""
    k, rows, cols = call.logits.shape
    n_groups = cols // call.group_size
    block_r, block_c = _blocks(call.group_size)
    n_batch = 1 if grad is None else grad.n_batch
    common = dict(HAS_NOISE=call.noise_seed is not None, BLOCK_R=block_r, BLOCK_C=block_c,
                  WIDE=_wide(max(k, n_batch), rows * cols), EVEN_C=call.group_size % block_c == 0,
                  N_CHUNKS=triton.cdiv(call.group_size, block_c), FAST_LOG=_fast_log(call.logits),
                  N_ROUNDS=PHILOX_ROUNDS, num_warps=NUM_WARPS)
    seed = _check_seed(call.noise_seed)
    dims = (rows, cols, rows * cols, call.group_size, n_groups, float(call.kappa),
            1.0 / float(call.tau))
    grid = _grid(rows, n_groups, block_r)
    lead = (call.logits, call.s_eff)
    if call.kind == "categorical":
        valid = call.valid_u8 if call.valid_u8 is not None else call.logits  # unread if None
        lead = (*lead, call.values, valid)
        common.update(K=k, HAS_VALID=call.valid_u8 is not None, PER_WEIGHT=call.per_weight)
        fwd, bwd = _categorical_fwd_kernel, _categorical_bwd_kernel
    else:
        fwd, bwd = _ternary_fwd_kernel, _ternary_bwd_kernel
    with _on_device(call.logits):
        if grad is None:
            fwd[grid](*lead, out, seed, *dims, **common)
            return None
        grad_s = torch.empty((rows, n_groups), dtype=torch.float32, device=call.logits.device)
        seeds = grad.seeds if grad.seeds is not None else call.logits  # unread unless BATCHED
        bwd[grid](*lead, grad.grad_w, grad.grad_l, grad_s, seeds, seed, *dims,
                  float(call.kappa) / float(call.tau), ACCUM=grad.accum,
                  BATCHED=grad.seeds is not None, N_BATCH=n_batch, **common)
    return grad_s


def _backward(ctx, grad_w: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(∂ℓ or None, ∂s or None) of one call: immediate, accumulated into .grad, or deferred."""
    call, logits_param = ctx.call, ctx.logits_ref
    if isinstance(ctx.accumulate, DeferredGrads):
        ctx.accumulate.add(call, logits_param, ctx.scale_ref, grad_w.contiguous())
        return None, None
    grad_l, accum, in_place = _prepare_grad_target(logits_param, ctx.accumulate is True)
    grad_s = _launch(call, grad=_Grad(grad_w.contiguous(), grad_l, accum))
    return (None if in_place else grad_l), grad_s.to(call.scale_dtype)


def _resolve_accumulate(accumulate, logits: Tensor, scale: Tensor):
    """The accumulation mode of a call: False, True or a DeferredGrads (True becomes the
    process-wide one when GSQ_FUSED_DEFER > 1); deferral needs leaf parameters."""
    if accumulate is True and DEFER_N > 1:
        accumulate = default_deferred()
    leaf = logits.is_leaf and logits.requires_grad
    if isinstance(accumulate, DeferredGrads):
        return accumulate if leaf and scale.is_leaf else False
    return bool(accumulate) and leaf


class FusedCategoricalSample(torch.autograd.Function):
    """Fused W_soft = s · Σ_k p_k v_k; logits `(K, out, in)` with K in 2..5, scale `(out, in/g)`,
    values `(K, out|1, in|1)` (any dtype), valid `(K, out, in)` bool or None.

    `accumulate_grad`: False (return ∂ℓ), True (add ∂ℓ into logits.grad in-kernel) or a
    `DeferredGrads` (batch the gradients of several micro-steps; see the module doc)."""

    @staticmethod
    def forward(ctx, logits, scale, values, valid, kappa, tau, noise_seed, group_size, scale_dtype,
                out_dtype, accumulate_grad=False):  # noqa: D102
        k, rows, cols, _ = _geometry(logits, scale, group_size)
        if not 2 <= k <= MAX_CANDIDATES:
            raise ValueError(f"fused categorical sampler supports 2..5 candidates; got {k}")
        values_a, per_weight = _values_arg(values, k, rows, cols)
        valid_u8 = None if valid is None else valid.detach().contiguous().view(torch.uint8)
        call = _Call("categorical", logits.detach().contiguous(),
                     _effective_scale(scale, scale_dtype), values_a, valid_u8, per_weight,
                     kappa, tau, noise_seed, group_size, scale.dtype)
        out = torch.empty((rows, cols), dtype=out_dtype, device=logits.device)
        _launch(call, out=out)
        ctx.call, ctx.logits_ref, ctx.scale_ref = call, logits, scale
        ctx.accumulate = _resolve_accumulate(accumulate_grad, logits, scale)
        return out

    @staticmethod
    def backward(ctx, grad_w):  # noqa: D102
        grad_l, grad_s = _backward(ctx, grad_w)
        return (grad_l, grad_s, None, None, None, None, None, None, None, None, None)


class FusedTernarySample(torch.autograd.Function):
    """Fused W_soft = s · m · b with mask and sign logits `(2, out, in)` (`accumulate_grad` as
    in `FusedCategoricalSample`)."""

    @staticmethod
    def forward(ctx, logits, scale, kappa, tau, noise_seed, group_size, scale_dtype, out_dtype,
                accumulate_grad=False):  # noqa: D102
        k, rows, cols, _ = _geometry(logits, scale, group_size)
        if k != 2:
            raise ValueError(f"ternary logits must be (2, out, in); got {tuple(logits.shape)}")
        call = _Call("ternary", logits.detach().contiguous(), _effective_scale(scale, scale_dtype),
                     None, None, False, kappa, tau, noise_seed, group_size, scale.dtype)
        out = torch.empty((rows, cols), dtype=out_dtype, device=logits.device)
        _launch(call, out=out)
        ctx.call, ctx.logits_ref, ctx.scale_ref = call, logits, scale
        ctx.accumulate = _resolve_accumulate(accumulate_grad, logits, scale)
        return out

    @staticmethod
    def backward(ctx, grad_w):  # noqa: D102
        grad_l, grad_s = _backward(ctx, grad_w)
        return (grad_l, grad_s, None, None, None, None, None, None, None)


# --------------------------------------------------------------------------------------------
# Deferred (batched) gradients
# --------------------------------------------------------------------------------------------


class _Batch:
    """Pending micro-steps of one quantizer: its call, G copies `(n, out, in)` and seeds."""

    def __init__(self, call: _Call, logits: Tensor, scale: Tensor, grad_w: Tensor, n: int):
        self.call, self.logits, self.scale = call, logits, scale
        self.grads = torch.empty((n, *grad_w.shape), dtype=grad_w.dtype, device=grad_w.device)
        self.seeds: list[int] = []
        self.count = 0

    def add(self, call: _Call, grad_w: Tensor) -> None:
        self.grads[self.count].copy_(grad_w)
        self.seeds.append(_check_seed(call.noise_seed))
        self.count += 1

    def flush(self) -> None:
        """One backward pass over the logits for all pending micro-steps; adds into .grad."""
        device = self.grads.device
        seeds = torch.tensor(self.seeds, dtype=torch.int64)
        seeds = seeds.pin_memory().to(device, non_blocking=True) if device.type == "cuda" \
            else seeds.to(device)
        grad_l, accum, in_place = _prepare_grad_target(self.logits, True)
        grad_s = _launch(self.call, grad=_Grad(self.grads[: self.count], grad_l, accum, seeds,
                                               self.count))
        if not in_place:  # an existing .grad the kernel cannot write into
            self.logits.grad = self.logits.grad + grad_l
        if self.scale.requires_grad:
            grad_s = grad_s.to(self.call.scale_dtype)
            if self.scale.grad is None:
                self.scale.grad = grad_s
            else:
                self.scale.grad += grad_s


class DeferredGrads:
    """Batch the logit and scale gradients of up to `n` micro-steps per quantizer into one
    backward pass (pass it as `accumulate_grad`).

    The backward of a micro-step only copies its G `(out, in)` into a per-quantizer buffer
    `(n, out, in)` (2 + 2 bytes per weight in bf16) and returns no gradient; every `n`
    micro-steps one kernel regenerates each micro-step's noise, sums the gradients in registers
    and adds them into `logits.grad` / `scale.grad` once. With fp32 logits that replaces the
    backward's K·4 (logits) + 2·K·4 (.grad read and write) bytes per weight and micro-step by
    (K·4 + 2·K·4) / n + 6. Same sums as the immediate path, to fp32 round-off.

    Pending gradients are flushed when a quantizer has `n`, when the sampler settings of a
    quantizer change (κ, τ), on `flush()`, and before every `torch.optim.Optimizer.step` (a
    global pre-step hook, removed by `close()`). Code that reads `.grad` otherwise (gradient
    clipping, all-reduce) must call `flush()` first. The logits and scales must not change
    between a micro-step and its flush (true in the trainer: only the optimiser changes them).
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1; got {n}")
        self.n = n
        self._pending: dict[int, _Batch] = {}
        self._hook = register_optimizer_step_pre_hook(self._pre_step)

    def _pre_step(self, optimizer, args, kwargs) -> None:
        self.flush()

    def add(self, call: _Call, logits: Tensor, scale: Tensor, grad_w: Tensor) -> None:
        """Queue one micro-step's G for `logits`; flushes when `n` are pending."""
        key = id(logits)
        batch = self._pending.get(key)
        if batch is not None and not batch.call.batchable_with(call):
            self._flush_key(key)
            batch = None
        if batch is None:
            batch = self._pending[key] = _Batch(call, logits, scale, grad_w, self.n)
        batch.add(call, grad_w)
        if batch.count == self.n:
            self._flush_key(key)

    def _flush_key(self, key: int) -> None:
        batch = self._pending.pop(key)
        if batch.count:
            batch.flush()

    @property
    def pending(self) -> int:
        """Micro-steps queued over all quantizers."""
        return sum(b.count for b in self._pending.values())

    def flush(self) -> None:
        """Compute every pending gradient now."""
        for key in list(self._pending):
            self._flush_key(key)

    def close(self) -> None:
        """Flush and remove the optimiser hook."""
        self.flush()
        self._hook.remove()


DEFER_N = int(os.environ.get("GSQ_FUSED_DEFER", "1"))
_DEFAULT_DEFERRED: DeferredGrads | None = None


def default_deferred() -> DeferredGrads:
    """The process-wide DeferredGrads(GSQ_FUSED_DEFER) that `accumulate_grad=True` uses when
    that variable is > 1."""
    global _DEFAULT_DEFERRED
    if _DEFAULT_DEFERRED is None:
        _DEFAULT_DEFERRED = DeferredGrads(DEFER_N)
    return _DEFAULT_DEFERRED
