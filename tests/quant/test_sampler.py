"""Closed-form backward and noise replay of the Gumbel-Softmax samplers (method §4, §4.1).

The reference for every gradient is autograd through a plain-torch forward that draws the *same*
noise (`seeded_uniform` with the same seed), in float64 with the scale cast disabled.
"""

from __future__ import annotations

import pytest
import torch

from gsq.quant import sampler as sampler_mod
from gsq.quant.grids import expand_scale
from gsq.quant.noise import gumbel_from_uniform, logistic_from_uniform, seeded_uniform
from gsq.quant.sampler import CategoricalSample, TernarySample, categorical_probs, ternary_probs

F64 = torch.float64
OUT, IN, G = 6, 16, 8
SEED = 1234
KAPPA, TAU = 100.0, 2.0


def _rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _grid_values():
    return torch.tensor([-2.0, -1.0, 0.0, 1.0], dtype=F64).view(4, 1, 1)


def _shift_values_and_valid(bits: int = 3):
    """Per-weight values (5, out, in) for init codes that include both grid edges."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    gen = torch.Generator().manual_seed(7)
    j0 = torch.randint(qmin, qmax + 1, (OUT, IN), generator=gen)
    j0[0, :2] = qmin
    j0[1, :2] = qmax
    raw = j0.unsqueeze(0) + torch.arange(-2, 3).view(5, 1, 1)
    valid = (raw >= qmin) & (raw <= qmax)
    return raw.clamp(qmin, qmax).to(torch.int8), valid


def _reference_categorical(logits, scale, values, valid, kappa, tau, seed):
    """Plain-torch forward with the sampler's noise: s · Σ_k softmax((κℓ + g)/τ)_k v_k."""
    z = logits * kappa
    if seed is not None:
        u = seeded_uniform(tuple(logits.shape), seed, logits.device)
        z = z + gumbel_from_uniform(u).to(F64)
    z = z / tau
    if valid is not None:
        z = z.masked_fill(~valid, float("-inf"))
    p = torch.softmax(z, dim=0)
    return expand_scale(scale, G) * (p * values.to(F64)).sum(0)


def _reference_ternary(logits, scale, kappa, tau, seed):
    z = 2.0 * kappa * logits
    if seed is not None:
        u = seeded_uniform(tuple(logits.shape), seed, logits.device)
        z = z + logistic_from_uniform(u).to(F64)
    sig = torch.sigmoid(z / tau)
    m, b = sig[0], 2.0 * sig[1] - 1.0
    return expand_scale(scale, G) * m * b


def _categorical(logits, scale, values, valid, kappa=KAPPA, tau=TAU, seed=SEED, scale_dtype=None):
    return CategoricalSample.apply(logits, scale, values, valid, kappa, tau, seed, G, scale_dtype,
                                   F64)


def _ternary(logits, scale, kappa=KAPPA, tau=TAU, seed=SEED, scale_dtype=None):
    return TernarySample.apply(logits, scale, kappa, tau, seed, G, scale_dtype, F64)


def _grads(fn, logits, scale, R):
    logits = logits.detach().clone().requires_grad_(True)
    scale = scale.detach().clone().requires_grad_(True)
    W = fn(logits, scale)
    (W * R).sum().backward()
    return W.detach(), logits.grad, scale.grad


def _assert_rel_close(actual, expected, rtol):
    err = (actual - expected).abs().max().item()
    ref = expected.abs().max().item()
    assert ref > 0, "reference gradient is identically zero: the test would prove nothing"
    assert err <= rtol * ref, f"max abs err {err:.3e} vs max |ref| {ref:.3e}"


# The three categorical cases of the brief: the 2-bit grid (values (4, 1, 1)), and the shift
# quantizer's per-weight values (5, out, in) with and without the `valid` mask.
def _case(name):
    if name == "grid":
        return _rand(4, OUT, IN, seed=1, scale=0.02), _grid_values(), None
    values, valid = _shift_values_and_valid()
    logits = _rand(5, OUT, IN, seed=2, scale=0.02)
    return logits, values, (valid if name == "shift-mask" else None)


@pytest.mark.parametrize("case", ["grid", "shift-clip", "shift-mask"])
@pytest.mark.parametrize("seed", [SEED, None])
def test_categorical_backward_matches_autograd(case, seed):
    logits, values, valid = _case(case)
    scale = _rand(OUT, IN // G, seed=3, scale=0.05)
    R = _rand(OUT, IN, seed=4)  # random upstream gradient

    def ours(lg, s):
        return _categorical(lg, s, values, valid, seed=seed)

    def reference(lg, s):
        return _reference_categorical(lg, s, values, valid, KAPPA, TAU, seed)

    W, gl, gs = _grads(ours, logits, scale, R)
    W_ref, gl_ref, gs_ref = _grads(reference, logits, scale, R)

    torch.testing.assert_close(W, W_ref, rtol=1e-13, atol=0)
    _assert_rel_close(gl, gl_ref, 1e-12)
    _assert_rel_close(gs, gs_ref, 1e-12)
    assert gl.dtype == F64 and gs.dtype == F64
    if valid is not None:
        assert (gl[~valid] == 0).all(), "masked slots must get exactly zero gradient"
        assert (~valid).any()


@pytest.mark.parametrize("seed", [SEED, None])
def test_ternary_backward_matches_autograd(seed):
    logits = _rand(2, OUT, IN, seed=5, scale=0.01)
    scale = _rand(OUT, IN // G, seed=6, scale=0.05)
    R = _rand(OUT, IN, seed=8)

    W, gl, gs = _grads(lambda lg, s: _ternary(lg, s, seed=seed), logits, scale, R)
    W_ref, gl_ref, gs_ref = _grads(
        lambda lg, s: _reference_ternary(lg, s, KAPPA, TAU, seed), logits, scale, R)

    torch.testing.assert_close(W, W_ref, rtol=1e-13, atol=0)
    _assert_rel_close(gl[0], gl_ref[0], 1e-12)  # mask logits
    _assert_rel_close(gl[1], gl_ref[1], 1e-12)  # sign logits
    _assert_rel_close(gs, gs_ref, 1e-12)


def test_gradcheck_categorical_grid_and_mask():
    # Mild κ/τ so that finite differences resolve the softmax; noise still on (fixed by the seed).
    logits = _rand(4, 2, 8, seed=10, scale=0.5).requires_grad_(True)
    scale = _rand(2, 1, seed=11, scale=0.5).requires_grad_(True)
    values = _grid_values()

    def f(lg, s):
        return CategoricalSample.apply(lg, s, values, None, 1.0, 1.5, SEED, 8, None, F64)

    assert torch.autograd.gradcheck(f, (logits, scale), eps=1e-6, atol=1e-8, rtol=1e-6)

    j0 = torch.tensor([-4, -3, 0, 2, 3, 3, -4, 1]).view(1, 1, 8)  # 3-bit codes incl. both edges
    raw = j0 + torch.arange(-2, 3).view(5, 1, 1)
    valid = ((raw >= -4) & (raw <= 3)).expand(5, 2, 8).contiguous()
    shift_values = raw.clamp(-4, 3).expand(5, 2, 8).to(torch.int8).contiguous()
    logits5 = _rand(5, 2, 8, seed=12, scale=0.5).requires_grad_(True)

    def g(lg, s):
        return CategoricalSample.apply(lg, s, shift_values, valid, 1.0, 1.5, SEED, 8, None, F64)

    assert torch.autograd.gradcheck(g, (logits5, scale), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_ternary():
    logits = _rand(2, 2, 8, seed=13, scale=0.5).requires_grad_(True)
    scale = _rand(2, 1, seed=14, scale=0.5).requires_grad_(True)

    def f(lg, s):
        return TernarySample.apply(lg, s, 1.0, 1.5, SEED, 8, None, F64)

    assert torch.autograd.gradcheck(f, (logits, scale), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Noise replay


def _grid_call(seed):
    logits = _rand(4, OUT, IN, seed=1, scale=0.02).requires_grad_(True)
    scale = _rand(OUT, IN // G, seed=3, scale=0.05).requires_grad_(True)
    W = _categorical(logits, scale, _grid_values(), None, seed=seed)
    (W * _rand(OUT, IN, seed=4)).sum().backward()
    return W.detach(), logits.grad, scale.grad


def _ternary_call(seed):
    logits = _rand(2, OUT, IN, seed=5, scale=0.01).requires_grad_(True)
    scale = _rand(OUT, IN // G, seed=6, scale=0.05).requires_grad_(True)
    W = _ternary(logits, scale, seed=seed)
    (W * _rand(OUT, IN, seed=8)).sum().backward()
    return W.detach(), logits.grad, scale.grad


@pytest.mark.parametrize("call", [_grid_call, _ternary_call], ids=["categorical", "ternary"])
def test_same_seed_is_bitwise_identical_and_other_seed_differs(call):
    a, b, c = call(SEED), call(SEED), call(SEED + 1)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])  # forward
    assert not torch.equal(a[1], c[1])  # logit gradients
    assert not torch.equal(a[2], c[2])  # scale gradients


@pytest.mark.parametrize("call", [_grid_call, _ternary_call], ids=["categorical", "ternary"])
def test_backward_replays_the_forward_noise(call, monkeypatch):
    """The backward regenerates noise from the forward's seed (and from nothing else)."""
    seen = []
    real = sampler_mod.seeded_uniform

    def spy(shape, noise_seed, device):
        seen.append((tuple(shape), noise_seed))
        return real(shape, noise_seed, device)

    monkeypatch.setattr(sampler_mod, "seeded_uniform", spy)
    call(SEED)
    assert len(seen) == 2, "one noise draw in the forward and one replay in the backward"
    assert seen[0] == seen[1] and seen[0][1] == SEED


def test_noise_free_probs_ignore_seedless_rng_state():
    """noise_seed=None draws nothing: the result is independent of the global RNG."""
    logits = _rand(4, OUT, IN, seed=1)
    torch.manual_seed(0)
    p1 = categorical_probs(logits, None, KAPPA, TAU, None)
    torch.manual_seed(1)
    p2 = categorical_probs(logits, None, KAPPA, TAU, None)
    assert torch.equal(p1, p2)
    torch.testing.assert_close(p1, torch.softmax(logits * KAPPA / TAU, 0), rtol=0, atol=0)
    m, b = ternary_probs(logits[:2], KAPPA, TAU, None)
    torch.testing.assert_close(m, torch.sigmoid(2 * KAPPA * logits[0] / TAU), rtol=0, atol=0)
    expected_b = 2 * torch.sigmoid(2 * KAPPA * logits[1] / TAU) - 1
    torch.testing.assert_close(b, expected_b, rtol=0, atol=0)


def test_default_bf16_scale_cast_in_forward():
    """With scale_dtype=bf16 the forward uses bf16-rounded scales; the gradient treats the cast as
    the identity (the scale gradient still equals Σ_group G · soft code)."""
    logits = _rand(4, OUT, IN, seed=1, scale=0.02).requires_grad_(True)
    scale = (_rand(OUT, IN // G, seed=3, scale=0.05) + 1e-4).requires_grad_(True)
    W = _categorical(logits, scale, _grid_values(), None, seed=None, scale_dtype=torch.bfloat16)
    s16 = scale.detach().to(torch.bfloat16).to(F64)
    assert not torch.equal(s16, scale.detach())
    code = (torch.softmax(logits.detach() * KAPPA / TAU, 0) * _grid_values()).sum(0)
    torch.testing.assert_close(W, expand_scale(s16, G) * code, rtol=1e-14, atol=0)
    R = _rand(OUT, IN, seed=4)
    (W * R).sum().backward()
    expected = (R * code).reshape(OUT, IN // G, G).sum(-1)
    torch.testing.assert_close(scale.grad, expected, rtol=1e-12, atol=0)


def test_fp32_logits_give_fp32_output_and_grads():
    logits = _rand(4, OUT, IN, seed=1, scale=0.02).float().requires_grad_(True)
    scale = _rand(OUT, IN // G, seed=3, scale=0.05).float().requires_grad_(True)
    W = CategoricalSample.apply(logits, scale, _grid_values().float(), None, KAPPA, TAU, SEED, G,
                                torch.bfloat16, torch.float32)
    assert W.dtype == torch.float32
    W.sum().backward()
    assert logits.grad.dtype == torch.float32 and scale.grad.dtype == torch.float32
    assert torch.isfinite(logits.grad).all() and torch.isfinite(scale.grad).all()
