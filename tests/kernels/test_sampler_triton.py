"""Fused Triton samplers vs the torch reference (method §4.1, §18.1 option B).

Without a GPU the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by
this folder's conftest). The torch path is fed the kernels' own uniforms (`triton_uniform`) by
patching `gsq.quant.sampler.seeded_uniform`, so both paths see the same noise and must agree to
fp32 round-off (bf16 rounding for bf16 outputs or logits). The `gpu` test runs real Llama-8B
shapes on CUDA (deselected by default).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from gsq import kernels  # noqa: E402
from gsq.kernels import sampler_triton as st  # noqa: E402
from gsq.quant import sampler as sampler_mod  # noqa: E402
from gsq.quant.grids import expand_scale, to_bf16_grid  # noqa: E402
from gsq.quant.quantizers import InitConfig, make_quantizer  # noqa: E402
from gsq.quant.sampler import (  # noqa: E402
    CategoricalSample,
    TernarySample,
    categorical_probs,
    ternary_probs,
)
from gsq.quant.types import QuantizedWeight, QuantSpec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT, IN = 8, 128
SEED = 0x1234_5678_9ABC  # > 2^32: exercises both words of the Philox key
KAPPA, TAU = 100.0, 2.0
BF16 = torch.bfloat16
# fp32 tolerances (relative to the largest reference value): the interpreter runs exact logs and
# divisions; compiled CUDA kernels use ex2/lg2.approx and approximate division (~1e-7 relative).
RTOL_W = 1e-6 if DEVICE == "cpu" else 1e-5
RTOL_G = 1e-5 if DEVICE == "cpu" else 5e-5


@pytest.fixture
def same_noise(monkeypatch):
    """Make the torch reference draw the fused kernels' uniforms."""
    monkeypatch.setattr(sampler_mod, "seeded_uniform", st.triton_uniform)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _quantizer(bits, group_size, edge="clip", logits_dtype=torch.float32, seed=0):
    """A real gsq quantizer around random codes (both grid edges present) with signed scales."""
    spec = QuantSpec(bits, group_size)
    gen = _gen(seed)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (OUT, IN), generator=gen)
    codes[0, :3], codes[1, :3] = spec.qmin, spec.qmax
    scale = torch.randn(OUT, IN // group_size, generator=gen) * 0.05
    scale[0, 0] = -abs(scale[0, 0]) - 0.01  # at least one negative scale
    init = QuantizedWeight(codes.to(torch.int8), to_bf16_grid(scale), spec)
    cfg = InitConfig(init_std=0.02, shift_edge=edge, logits_dtype=logits_dtype)
    q = make_quantizer(init, cfg, _gen(seed + 1))
    return q.to(DEVICE)


CASES = {  # name: (bits, group size, shift edge)
    "grid2-g32": (2, 32, "clip"),
    "grid2-g64": (2, 64, "clip"),
    "shift3-clip-g64": (3, 64, "clip"),
    "shift4-mask-g32": (4, 32, "mask"),
    "shift3-mask-g64": (3, 64, "mask"),
    "ternary-g32": ("ternary", 32, "clip"),
}


def _valid(q):
    return getattr(q, "valid", None)


def _torch_soft(q, seed, out_dtype, kappa=KAPPA, tau=TAU):
    if q.spec.is_ternary:
        return TernarySample.apply(q.logits, q.scale, kappa, tau, seed, q.spec.group_size,
                                   q.scale_dtype, out_dtype)
    return CategoricalSample.apply(q.logits, q.scale, q.values, _valid(q), kappa, tau, seed,
                                   q.spec.group_size, q.scale_dtype, out_dtype)


def _fused_soft(q, seed, out_dtype, accumulate=False, kappa=KAPPA, tau=TAU):
    if q.spec.is_ternary:
        return st.FusedTernarySample.apply(q.logits, q.scale, kappa, tau, seed, q.spec.group_size,
                                           q.scale_dtype, out_dtype, accumulate)
    return st.FusedCategoricalSample.apply(q.logits, q.scale, q.values, _valid(q), kappa, tau, seed,
                                           q.spec.group_size, q.scale_dtype, out_dtype, accumulate)


def _run(fn, q, upstream):
    """(W, ∂ℓ, ∂s) of `(W · upstream).sum()`, gradients fresh."""
    q.zero_grad(set_to_none=True)
    W = fn(q)
    (W.float() * upstream).sum().backward()
    return W.detach(), q.logits.grad.clone(), q.scale.grad.clone()


def _assert_rel(actual, expected, rtol, what=""):
    actual, expected = actual.float(), expected.float()
    err = (actual - expected).abs().max().item()
    ref = expected.abs().max().item()
    assert ref > 0, f"{what}: reference is identically zero, the test would prove nothing"
    assert err <= rtol * ref, f"{what}: max abs err {err:.3e} vs max |ref| {ref:.3e}"


def _assert_bf16_close(actual, expected):
    """Elementwise within one bf16 ulp (fp32 results that straddle a rounding boundary)."""
    expected = expected.float()
    atol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected, rtol=2**-7, atol=atol)


def _upstream(seed=9):
    return torch.randn(OUT, IN, generator=_gen(seed)).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# Noise


def test_uniforms_range_prefix_and_seeds():
    u5 = st.triton_uniform((5, OUT, IN), SEED, DEVICE)
    u4 = st.triton_uniform((4, OUT, IN), SEED, DEVICE)
    assert u5.dtype == torch.float32 and u5.shape == (5, OUT, IN)
    assert u5.min() >= st.UNIFORM_EPS and u5.max() <= 1.0 - st.UNIFORM_EPS
    assert torch.equal(u5[:4], u4), "candidate k's uniform must not depend on K"
    assert torch.equal(u5, st.triton_uniform((5, OUT, IN), SEED, DEVICE))
    assert not torch.equal(u5, st.triton_uniform((5, OUT, IN), SEED + 1, DEVICE))
    hi = st.triton_uniform((5, OUT, IN), SEED + (1 << 62), DEVICE)  # only the high word differs
    assert not torch.equal(u5, hi)
    assert abs(u5.mean().item() - 0.5) < 0.02 and abs(u5.std().item() - 12**-0.5) < 0.02
    assert len({round(x, 6) for x in u5[:, 0, 0].tolist()}) == 5  # candidates independent
    with pytest.raises(ValueError):
        st.triton_uniform((2, 4, 4), 1 << 63, DEVICE)


# ---------------------------------------------------------------------------------------------
# Forward and backward vs the torch path with the same noise


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_torch_path(case, same_noise):
    bits, g, edge = CASES[case]
    q = _quantizer(bits, g, edge)
    R = _upstream()
    W, gl, gs = _run(lambda q: _fused_soft(q, SEED, torch.float32), q, R)
    W_ref, gl_ref, gs_ref = _run(lambda q: _torch_soft(q, SEED, torch.float32), q, R)
    _assert_rel(W, W_ref, RTOL_W, "forward")
    _assert_rel(gl, gl_ref, RTOL_G, "logit gradient")
    _assert_rel(gs, gs_ref, RTOL_G, "scale gradient")
    assert gl.dtype == torch.float32 and gs.dtype == torch.float32
    if _valid(q) is not None:
        assert (~q.valid).any()
        assert (gl[~q.valid] == 0).all(), "masked shifts must get exactly zero gradient"


@pytest.mark.parametrize("case", ["grid2-g32", "shift3-mask-g64", "ternary-g32"])
def test_bf16_output_matches_torch_path(case, same_noise):
    bits, g, edge = CASES[case]
    q = _quantizer(bits, g, edge)
    R = _upstream()
    W, gl, gs = _run(lambda q: _fused_soft(q, SEED, BF16), q, R)
    W_ref, gl_ref, gs_ref = _run(lambda q: _torch_soft(q, SEED, BF16), q, R)
    assert W.dtype == BF16
    _assert_bf16_close(W, W_ref)
    if DEVICE == "cuda":  # the interpreter truncates fp32 -> bf16; compiled kernels round (RTNE)
        assert torch.eq(W, W_ref).float().mean() > 0.95
    _assert_rel(gl, gl_ref, RTOL_G, "logit gradient")  # the upstream gradient is bf16 in both
    _assert_rel(gs, gs_ref, RTOL_G, "scale gradient")


@pytest.mark.parametrize("case", ["grid2-g64", "shift4-mask-g32", "ternary-g32"])
def test_bf16_logits_match_torch_path(case, same_noise):
    bits, g, edge = CASES[case]
    q = _quantizer(bits, g, edge, logits_dtype=BF16)
    R = _upstream()
    W, gl, gs = _run(lambda q: _fused_soft(q, SEED, BF16), q, R)
    W_ref, gl_ref, gs_ref = _run(lambda q: _torch_soft(q, SEED, BF16), q, R)
    assert gl.dtype == BF16
    _assert_bf16_close(W, W_ref)
    _assert_bf16_close(gl, gl_ref)
    _assert_rel(gs, gs_ref, RTOL_G, "scale gradient")


@pytest.mark.parametrize("case", ["grid2-g32", "shift3-clip-g64", "shift4-mask-g32",
                                  "ternary-g32"])
def test_gradients_match_autograd_of_plain_torch_forward(case, same_noise):
    """Noise replay: the fused backward equals autograd through a plain forward with the noise
    of the same seed (scale cast off, so the forward is exactly differentiable)."""
    bits, g, edge = CASES[case]
    q = _quantizer(bits, g, edge)
    q.scale_dtype = None
    R = _upstream()

    def plain(q):
        s = expand_scale(q.scale, g)
        if q.spec.is_ternary:
            m, b = ternary_probs(q.logits, KAPPA, TAU, SEED)
            return s * m * b
        p = categorical_probs(q.logits, _valid(q), KAPPA, TAU, SEED)
        return s * (p * q.values.float()).sum(0)

    W, gl, gs = _run(lambda q: _fused_soft(q, SEED, torch.float32), q, R)
    W_ref, gl_ref, gs_ref = _run(plain, q, R)
    _assert_rel(W, W_ref, RTOL_W, "forward")
    _assert_rel(gl, gl_ref, RTOL_G, "logit gradient")
    _assert_rel(gs, gs_ref, RTOL_G, "scale gradient")


@pytest.mark.parametrize("k", [2, 4, 5])
def test_generic_candidate_counts_without_noise(k):
    """K in {2, 4, 5} with shared values, noise off (seed None): no patching needed."""
    logits = (torch.randn(k, OUT, IN, generator=_gen(3)) * 0.03).to(DEVICE).requires_grad_()
    scale = (torch.randn(OUT, IN // 64, generator=_gen(4)) * 0.05).to(DEVICE).requires_grad_()
    values = torch.linspace(-2.0, 2.0, k).view(k, 1, 1).to(DEVICE)
    R = _upstream()
    outs = []
    for fn in (st.FusedCategoricalSample.apply, CategoricalSample.apply):
        W = fn(logits, scale, values, None, KAPPA, TAU, None, 64, BF16, torch.float32)
        outs.append((W.detach(), *torch.autograd.grad((W * R).sum(), (logits, scale))))
    for a, b, what in zip(outs[0], outs[1], ("forward", "logits", "scale"), strict=True):
        _assert_rel(a, b, RTOL_G, what)


def test_int64_index_path(monkeypatch, same_noise):
    """The int64-index variant (layers with ceil(K/4)·4·out·in >= 2^31) gives the same numbers."""
    q = _quantizer(3, 32, "mask")
    R = _upstream()
    narrow = _run(lambda q: _fused_soft(q, SEED, torch.float32), q, R)
    u_narrow = st.triton_uniform((5, OUT, IN), SEED, DEVICE)
    monkeypatch.setattr(st, "_wide", lambda k, n_w: True)
    wide = _run(lambda q: _fused_soft(q, SEED, torch.float32), q, R)
    assert torch.equal(u_narrow, st.triton_uniform((5, OUT, IN), SEED, DEVICE))
    for a, b in zip(narrow, wide, strict=True):
        assert torch.equal(a, b)


def test_philox_rounds_setting_is_consistent(monkeypatch, same_noise):
    """GSQ_FUSED_PHILOX_ROUNDS changes the stream, for the kernels and triton_uniform alike."""
    u10 = st.triton_uniform((4, OUT, IN), SEED, DEVICE)
    monkeypatch.setattr(st, "PHILOX_ROUNDS", 7)
    assert not torch.equal(u10, st.triton_uniform((4, OUT, IN), SEED, DEVICE))
    q = _quantizer(2, 32)
    R = _upstream()
    W, gl, _ = _run(lambda q: _fused_soft(q, SEED, torch.float32), q, R)
    W_ref, gl_ref, _ = _run(lambda q: _torch_soft(q, SEED, torch.float32), q, R)
    _assert_rel(W, W_ref, RTOL_W, "forward")
    _assert_rel(gl, gl_ref, RTOL_G, "logit gradient")


# ---------------------------------------------------------------------------------------------
# Seeds, replay and fused accumulation


@pytest.mark.parametrize("case", ["grid2-g32", "shift3-mask-g64", "ternary-g32"])
def test_same_seed_identical_other_seed_differs(case):
    bits, g, edge = CASES[case]
    q = _quantizer(bits, g, edge)
    R = _upstream()
    a = _run(lambda q: _fused_soft(q, SEED, BF16), q, R)
    b = _run(lambda q: _fused_soft(q, SEED, BF16), q, R)
    c = _run(lambda q: _fused_soft(q, SEED + 1, BF16), q, R)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


@pytest.mark.parametrize("case", ["grid2-g64", "shift4-mask-g32", "ternary-g32"])
def test_fused_grad_accumulation(case):
    """accumulate_grad=True writes/adds ∂ℓ into logits.grad: two micro-batches give the sum of
    the two separate gradients; the scale gradient still goes through autograd."""
    bits, g, edge = CASES[case]
    q = _quantizer(bits, g, edge)
    R1, R2 = _upstream(1), _upstream(2)
    sep = [_run(lambda q, s=s: _fused_soft(q, s, torch.float32), q, R)
           for s, R in ((SEED, R1), (SEED + 7, R2))]
    q.zero_grad(set_to_none=True)
    for s, R in ((SEED, R1), (SEED + 7, R2)):
        W = _fused_soft(q, s, torch.float32, accumulate=True)
        (W * R).sum().backward()
    torch.testing.assert_close(q.logits.grad, sep[0][1] + sep[1][1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.scale.grad, sep[0][2] + sep[1][2], rtol=1e-6, atol=1e-6)


def _micro_steps(q, seeds, accumulate, kappas=None):
    """Backward of one micro-step per seed (upstream gradient _upstream(i)) with `accumulate`."""
    for i, seed in enumerate(seeds):
        kappa = KAPPA if kappas is None else kappas[i]
        W = _fused_soft(q, seed, torch.float32, accumulate=accumulate, kappa=kappa)
        (W * _upstream(i)).sum().backward()


def _summed_grads(q, seeds, kappas=None):
    """Reference: the immediate path's gradients summed by autograd."""
    q.zero_grad(set_to_none=True)
    _micro_steps(q, seeds, False, kappas)
    out = q.logits.grad.clone(), q.scale.grad.clone()
    q.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("case", ["grid2-g64", "shift4-mask-g32", "ternary-g32"])
def test_deferred_batches_equal_the_summed_gradients(case):
    bits, g, edge = CASES[case]
    q = _quantizer(bits, g, edge)
    seeds = [SEED + 11 * i for i in range(5)]
    ref_l, ref_s = _summed_grads(q, seeds)
    deferred = st.DeferredGrads(3)
    try:
        _micro_steps(q, seeds, deferred)
        assert deferred.pending == 2  # 3 flushed when full, 2 waiting
        deferred.flush()
        assert deferred.pending == 0
    finally:
        deferred.close()
    torch.testing.assert_close(q.logits.grad, ref_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.scale.grad, ref_s, rtol=1e-5, atol=1e-6)


def test_deferred_flushes_before_an_optimizer_step_and_on_new_settings():
    q = _quantizer(2, 32)
    seeds, kappas = [SEED, SEED + 1, SEED + 2], [KAPPA, KAPPA, 2 * KAPPA]
    ref_l, ref_s = _summed_grads(q, seeds, kappas)
    before = q.logits.detach().clone(), q.scale.detach().clone()
    deferred = st.DeferredGrads(8)
    try:
        _micro_steps(q, seeds, deferred, kappas)
        assert deferred.pending == 1  # κ changed: the first two were flushed
        torch.optim.SGD(q.parameters(), lr=0.5).step()  # the pre-step hook flushes the rest
        assert deferred.pending == 0
    finally:
        deferred.close()
    torch.testing.assert_close(q.logits.detach(), before[0] - 0.5 * ref_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.scale.detach(), before[1] - 0.5 * ref_s, rtol=1e-5, atol=1e-6)


def test_env_default_deferral(monkeypatch):
    """accumulate_grad=True defers through the process-wide DeferredGrads when GSQ_FUSED_DEFER
    (read at import) is > 1."""
    q = _quantizer(3, 64, "mask")
    seeds = [SEED, SEED + 5]
    ref_l, _ = _summed_grads(q, seeds)
    monkeypatch.setattr(st, "DEFER_N", 4)
    monkeypatch.setattr(st, "_DEFAULT_DEFERRED", None)
    try:
        _micro_steps(q, seeds, True)
        assert q.logits.grad is None and st.default_deferred().pending == 2
        st.default_deferred().flush()
    finally:
        st.default_deferred().close()
    torch.testing.assert_close(q.logits.grad, ref_l, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Dispatch and fused Lion


def test_dispatch_uses_torch_on_cpu(monkeypatch):
    q = _quantizer(2, 32).to("cpu")
    assert not kernels.use_fused(q.logits)
    assert not kernels.use_fused(q.logits.double())
    ref = CategoricalSample.apply(q.logits, q.scale, q.values, None, KAPPA, TAU, SEED, 32, BF16,
                                  torch.float32)
    got = sampler_mod.categorical_sample(q.logits, q.scale, q.values, None, KAPPA, TAU, SEED, 32,
                                         BF16, torch.float32)
    assert torch.equal(ref, got)
    assert not kernels.lion_uses_triton([q.logits, q.scale])  # CPU tensors: torch Lion
    monkeypatch.setenv("GSQ_FUSED", "0")
    assert not kernels.use_fused(q.logits.to(DEVICE))
    assert not kernels.lion_uses_triton([q.logits.to(DEVICE)])
    assert kernels.triton_available()


def _lion_reference(p, g, m, lr, wd, b1, b2):
    from lion_pytorch.lion_pytorch import update_fn

    p, m = p.clone(), m.clone()
    update_fn(p, g, m, lr, wd, b1, b2)
    return p, m


def test_lion_pytorch_triton_update_matches_torch_update():
    """lion_pytorch's maintained Triton Lion kernel (use_triton=True) equals its torch update.
    On CPU the kernel runs through the interpreter without the autotuner (which needs a GPU)."""
    import triton
    from lion_pytorch.triton import update_fn_kernel

    gen = _gen(5)
    p, g, m = (torch.randn(3000, generator=gen).to(DEVICE) * 0.01 for _ in range(3))
    lr, wd, b1, b2 = 1e-4, 1.0, 0.9, 0.95
    p_ref, m_ref = _lion_reference(p, g, m, lr, wd, b1, b2)
    if DEVICE == "cuda":
        from lion_pytorch.triton import update_fn
        update_fn(p, g, m, lr, wd, b1, b2)
    else:
        grid = (triton.cdiv(p.numel(), 1024),)
        update_fn_kernel.fn[grid](p, g, m, lr, wd, b1, b2, p.numel(), BLOCK_SIZE=1024)
    # fp32 round-off only (the compiled kernel fuses multiply-adds: ~1 ulp of |p| ~ 0.01)
    torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-9)
    # the kernel forms the momentum as (m - g)·β + g: the same value up to fp32 round-off
    torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Compiled code


def test_kernels_compile_for_sm90():
    """The kernels compile for H100 (sm_90) through triton's real pipeline and bundled ptxas,
    without a GPU, in a fresh process without TRITON_INTERPRET (see compile_sm90.py)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    script = Path(__file__).with_name("compile_sm90.py")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=300)
    if res.returncode == 3 or "ImportError" in res.stderr:  # compile_sm90.API_MISMATCH
        pytest.skip(f"this triton's compile API differs: {res.stderr.strip()[-300:]}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("compiled ") == 10


# ---------------------------------------------------------------------------------------------
# Real shapes on the device


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["grid2", "shift3-mask", "ternary"])
def test_real_shapes_on_cuda(kind, monkeypatch):
    """Llama-3.1-8B gate/up shape (14336 x 4096), g128, bf16 out: fused vs torch, same noise."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setattr(sampler_mod, "seeded_uniform", st.triton_uniform)
    rows, cols, g = 14336, 4096, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = {"grid2": 4, "shift3-mask": 5, "ternary": 2}[kind]
    logits = (torch.randn(k, rows, cols, device="cuda", generator=gen) * 0.05).requires_grad_()
    scale = (torch.randn(rows, cols // g, device="cuda", generator=gen) * 0.02).requires_grad_()
    R = torch.randn(rows, cols, device="cuda", generator=gen).to(BF16)
    if kind == "ternary":
        args = (KAPPA, TAU, SEED, g, BF16, BF16)
        fused, ref = st.FusedTernarySample.apply, TernarySample.apply
        call = [(fused, (logits, scale, *args)), (ref, (logits, scale, *args))]
    else:
        if kind == "grid2":
            values, valid = torch.tensor([-2.0, -1, 0, 1], device="cuda").view(4, 1, 1), None
        else:
            j0 = torch.randint(-4, 4, (rows, cols), device="cuda", generator=gen)
            raw = j0.unsqueeze(0) + torch.arange(-2, 3, device="cuda").view(5, 1, 1)
            values, valid = raw.clamp(-4, 3).to(torch.int8), (raw >= -4) & (raw <= 3)
        args = (KAPPA, TAU, SEED, g, BF16, BF16)
        call = [(st.FusedCategoricalSample.apply, (logits, scale, values, valid, *args)),
                (CategoricalSample.apply, (logits, scale, values, valid, *args))]
    results = []
    for fn, a in call:
        W = fn(*a)
        results.append((W.detach(), *torch.autograd.grad((W * R).sum(), (logits, scale))))
        del W
    (W, gl, gs), (W_ref, gl_ref, gs_ref) = results
    _assert_bf16_close(W, W_ref)
    _assert_rel(gl, gl_ref, 1e-4, "logit gradient")
    _assert_rel(gs, gs_ref, 1e-4, "scale gradient")
    with torch.no_grad():
        again = call[0][0](*call[0][1])
    assert torch.equal(again, W), "same seed must give the same soft weight"
