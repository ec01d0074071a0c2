"""Quantizers: logit init, hard rounding, grid edges, ternary rule and P3 (method §4.2, §5)."""

from __future__ import annotations

import pytest
import torch

from gsq.quant.gptq import gptq_quantize
from gsq.quant.quantizers import (
    GridQuantizer,
    InitConfig,
    ShiftQuantizer,
    TernaryQuantizer,
    make_quantizer,
)
from gsq.quant.rtn import rtn_quantize
from gsq.quant.sampler import categorical_probs
from gsq.quant.types import QuantizedWeight, QuantSpec

GEN_SEED = 42


def _gen(seed=GEN_SEED):
    return torch.Generator().manual_seed(seed)


def _init(codes, spec, scale_value=0.05):
    out, cols = codes.shape
    scale = torch.full((out, cols // spec.group_size), scale_value)
    return QuantizedWeight(codes.to(torch.int8), scale, spec)


def _eps(shape, seed=GEN_SEED):
    """The N(0, 1) part of the init, regenerated from the same generator seed."""
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# The 2-bit test vector (method §5)

ALPHA_PRIOR_Q0 = torch.tensor([-7.5, 1.5, 4.5, 1.5])


def test_two_bit_init_vector():
    spec = QuantSpec(2, 8)
    q = GridQuantizer(_init(torch.zeros(2, 8), spec), InitConfig(), _gen())
    assert q.logits.shape == (4, 2, 8) and q.logits.dtype == torch.float32
    alpha_prior = q.logits.detach() / 0.01 - _eps(q.logits.shape)
    expected = ALPHA_PRIOR_Q0.view(4, 1, 1).expand(4, 2, 8)
    torch.testing.assert_close(alpha_prior, expected, rtol=0, atol=1e-4)


def _noise_free_two_bit_logits():
    """Logits of init code 0 with the N(0, 1) part removed: 0.01 · α · c̃."""
    spec = QuantSpec(2, 8)
    q = GridQuantizer(_init(torch.zeros(1, 8), spec), InitConfig(init_std=0.01), _gen())
    return q.logits.detach() - 0.01 * _eps(q.logits.shape)


def test_two_bit_probabilities_at_start_and_end_of_schedule():
    logits = _noise_free_two_bit_logits()
    p_start = categorical_probs(logits, None, kappa=100.0, tau=2.0, noise_seed=None)
    expected = torch.tensor([0.002, 0.154, 0.690, 0.154]).view(4, 1, 1).expand_as(p_start)
    torch.testing.assert_close(p_start, expected, rtol=0, atol=1.5e-3)
    # exact value of the closed form, far tighter than the spec's 3 digits
    z = torch.tensor([-7.5, 1.5, 4.5, 1.5]) * 0.01 * 100 / 2
    torch.testing.assert_close(p_start[:, 0, 0], torch.softmax(z, 0), rtol=1e-5, atol=1e-6)

    p_end = categorical_probs(logits, None, kappa=500.0, tau=0.05, noise_seed=None)
    one_hot = torch.tensor([0.0, 0.0, 1.0, 0.0]).view(4, 1, 1).expand_as(p_end)
    torch.testing.assert_close(p_end, one_hot, rtol=0, atol=1e-12)


@pytest.mark.parametrize("q0, prior", [
    (-2, [0.0, -0.5, -2.0, -4.5]),
    (1, [-4.5, -2.0, -0.5, 0.0]),
])
def test_two_bit_prior_other_codes(q0, prior):
    spec = QuantSpec(2, 4)
    q = GridQuantizer(_init(torch.full((1, 4), q0), spec), InitConfig(), _gen())
    centred = torch.tensor(prior) - torch.tensor(prior).mean()
    got = q.logits.detach() / 0.01 - _eps(q.logits.shape)
    torch.testing.assert_close(got[:, 0, 0], 6.0 * centred, rtol=0, atol=1e-4)


def test_init_is_a_function_of_the_generator_only():
    spec = QuantSpec(2, 8)
    init = _init(torch.randint(-2, 2, (4, 16), generator=_gen(1)), spec)
    torch.manual_seed(0)
    a = GridQuantizer(init, InitConfig(), _gen(5)).logits
    torch.manual_seed(99)
    b = GridQuantizer(init, InitConfig(), _gen(5)).logits
    c = GridQuantizer(init, InitConfig(), _gen(6)).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_init_strength_defaults_and_override():
    assert InitConfig().strength(QuantSpec(2, 8)) == 6.0
    assert InitConfig().strength(QuantSpec(3, 8)) == 6.0
    assert InitConfig().strength(QuantSpec("ternary", 8)) == 3.0
    assert InitConfig(init_strength=1.5).strength(QuantSpec("ternary", 8)) == 1.5


def test_step_zero_argmax_equals_init_codes_with_zero_init_noise():
    """With σ_init's random part removed, the hard assignment at step 0 is exactly the init."""
    spec = QuantSpec(2, 8)
    codes = torch.randint(-2, 2, (8, 16), generator=_gen(3))
    q = GridQuantizer(_init(codes, spec), InitConfig(), _gen())
    with torch.no_grad():
        q.logits -= 0.01 * _eps(q.logits.shape)
    assert torch.equal(q.hard_codes(), codes.to(torch.int8))


# ---------------------------------------------------------------------------------------------
# Hard rounding


def test_grid_hard_codes_equal_argmax():
    spec = QuantSpec(2, 8)
    q = GridQuantizer(_init(torch.zeros(8, 16), spec), InitConfig(), _gen())
    with torch.no_grad():
        q.logits.copy_(torch.randn(q.logits.shape, generator=_gen(9)))
    expected = torch.tensor([-2, -1, 0, 1])[q.logits.detach().argmax(0)]
    assert q.hard_codes().dtype == torch.int8
    assert torch.equal(q.hard_codes(), expected.to(torch.int8))
    res = q.hard_result()
    assert torch.equal(res.codes, expected.to(torch.int8))
    assert torch.equal(res.scale, q.scale.detach().to(torch.bfloat16).float())


@pytest.mark.parametrize("bits", [3, 4])
def test_shift_hard_codes_equal_argmax_of_values(bits):
    spec = QuantSpec(bits, 8)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (8, 16), generator=_gen(2))
    q = ShiftQuantizer(_init(codes, spec), InitConfig(), _gen())
    with torch.no_grad():
        q.logits.copy_(torch.randn(q.logits.shape, generator=_gen(9)))
    idx = q.logits.detach().argmax(0)  # (out, in)
    expected = (codes + torch.tensor([-2, -1, 0, 1, 2])[idx]).clamp(spec.qmin, spec.qmax)
    assert torch.equal(q.hard_codes(), expected.to(torch.int8))


def _edge_codes(spec):
    """Init codes that sit on both grid edges and next to them."""
    row = torch.tensor([spec.qmin, spec.qmin + 1, spec.qmax - 1, spec.qmax] * 2)
    return row.repeat(2, 1)  # (2, 8)


@pytest.mark.parametrize("bits", [3, 4])
def test_shift_clip_at_grid_edges(bits):
    spec = QuantSpec(bits, 8)
    codes = _edge_codes(spec)
    q = ShiftQuantizer(_init(codes, spec), InitConfig(shift_edge="clip"), _gen())
    assert q.valid is None
    assert q.values.shape == (5, 2, 8)
    assert int(q.values.min()) == spec.qmin and int(q.values.max()) == spec.qmax
    # push every weight towards the largest and then the smallest shift: codes stay in the grid
    for k, clamp_to in ((4, spec.qmax), (0, spec.qmin)):
        with torch.no_grad():
            q.logits.zero_()
            q.logits[k] = 1.0
        hard = q.hard_codes()
        assert int(hard.min()) >= spec.qmin and int(hard.max()) <= spec.qmax
        shifted = codes + (2 if k == 4 else -2)
        assert torch.equal(hard, shifted.clamp(spec.qmin, spec.qmax).to(torch.int8))
        assert (hard == clamp_to).any()
    # clip: the prior is centred over all five shifts, as in the middle of the grid
    prior = q.logits.new_tensor([-2.0, -0.5, 0.0, -0.5, -2.0])
    q2 = ShiftQuantizer(_init(codes, spec), InitConfig(shift_edge="clip"), _gen())
    got = q2.logits.detach() / 0.01 - _eps(q2.logits.shape)
    torch.testing.assert_close(got[:, 0, 0], 6.0 * (prior - prior.mean()), rtol=0, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
def test_shift_mask_at_grid_edges(bits):
    spec = QuantSpec(bits, 8)
    codes = _edge_codes(spec)
    q = ShiftQuantizer(_init(codes, spec), InitConfig(shift_edge="mask"), _gen())
    raw = codes.unsqueeze(0) + torch.arange(-2, 3).view(5, 1, 1)
    expected_valid = (raw >= spec.qmin) & (raw <= spec.qmax)
    assert torch.equal(q.valid, expected_valid)
    # prior centred over the valid shifts only, 0 on invalid slots
    got = q.logits.detach() / 0.01 - _eps(q.logits.shape)
    at_qmax = got[:, 0, 3]  # code qmax: valid shifts -2, -1, 0
    prior = torch.tensor([-2.0, -0.5, 0.0])
    torch.testing.assert_close(at_qmax[:3], 6.0 * (prior - prior.mean()), rtol=0, atol=1e-4)
    torch.testing.assert_close(at_qmax[3:], torch.zeros(2), rtol=0, atol=1e-4)
    # even when an invalid shift has the largest logit, it is never chosen ...
    with torch.no_grad():
        q.logits.zero_()
        q.logits[4] = 1.0  # +2: invalid at qmax and qmax - 1
        q.logits[3] = 0.5
        q.logits[2] = 0.2  # "stay" beats -1 and -2
    hard = q.hard_codes()
    assert int(hard.min()) >= spec.qmin and int(hard.max()) <= spec.qmax
    assert (hard[:, 3] == spec.qmax).all()  # qmax: +1, +2 invalid, best valid is 0
    assert (hard[:, 2] == spec.qmax).all()  # qmax - 1: +1 valid
    # ... and gets probability zero in the soft weight
    p = categorical_probs(q.logits.detach(), q.valid, 100.0, 2.0, noise_seed=7)
    assert (p[~q.valid] == 0).all()
    torch.testing.assert_close(p.sum(0), torch.ones(2, 8), rtol=0, atol=1e-6)


def test_shift_edge_option_is_validated():
    spec = QuantSpec(3, 8)
    with pytest.raises(ValueError, match="shift_edge"):
        ShiftQuantizer(_init(torch.zeros(1, 8), spec), InitConfig(shift_edge="wrap"), _gen())


def test_ternary_hard_rule_is_greater_or_equal_zero():
    spec = QuantSpec("ternary", 4)
    q = TernaryQuantizer(_init(torch.zeros(1, 4), spec), InitConfig(), _gen())
    tiny = 1e-30
    with torch.no_grad():
        q.logits.copy_(torch.tensor([
            [[0.0, 0.0, -tiny, 0.5]],  # mask logits: >= 0 keeps the weight
            [[0.0, -tiny, 0.3, -0.5]],  # sign logits: >= 0 is +1
        ]))
    assert q.hard_codes().tolist() == [[1, -1, 0, -1]]
    assert q.hard_codes().dtype == torch.int8


def test_ternary_init_prior():
    spec = QuantSpec("ternary", 4)
    codes = torch.tensor([[-1, 0, 1, 1]])
    q = TernaryQuantizer(_init(codes, spec), InitConfig(), _gen())
    got = q.logits.detach() / 0.01 - _eps(q.logits.shape)
    mask_prior = torch.tensor([1.0, -1.0, 1.0, 1.0])
    sign_prior = torch.tensor([-1.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(got[0, 0], 3.0 * mask_prior, rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1, 0], 3.0 * sign_prior, rtol=0, atol=1e-4)
    with torch.no_grad():
        q.logits -= 0.01 * _eps(q.logits.shape)
    # sign logit of a zero code is exactly 0 -> +1 by the >= rule, but the mask removes it
    assert q.hard_codes().tolist() == [[-1, 0, 1, 1]]


# ---------------------------------------------------------------------------------------------
# Pitfall P3: finite, non-zero scales and logits for all-zero groups


@pytest.mark.parametrize("init_fn", ["rtn", "gptq", "gptq-static"])
def test_ternary_all_zero_group_gets_finite_nonzero_scale(init_fn):
    spec = QuantSpec("ternary", 8)
    W = torch.randn(4, 16, generator=_gen(1))
    W[:, :8] = 0.0  # first group of every row is all zero
    W[2] = 0.0  # and one whole row
    if init_fn == "rtn":
        init = rtn_quantize(W, spec)
    else:
        X = torch.randn(256, 16, generator=_gen(2))
        init = gptq_quantize(W, 2 / 256 * X.T @ X, spec, static_groups=init_fn == "gptq-static")
    assert torch.isfinite(init.scale).all() and (init.scale != 0).all()
    assert (init.codes[:, :8] == 0).all()
    q = make_quantizer(init, InitConfig(), _gen())
    assert isinstance(q, TernaryQuantizer)
    assert torch.isfinite(q.logits).all()
    W_soft = q.soft(2.0, 100.0, 11, torch.float32)
    assert torch.isfinite(W_soft).all()


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf")])
def test_make_quantizer_rejects_bad_scales(bad):
    spec = QuantSpec("ternary", 8)
    init = _init(torch.zeros(2, 16), spec)
    init.scale[1, 0] = bad
    with pytest.raises(FloatingPointError):
        make_quantizer(init, InitConfig(), _gen())


@pytest.mark.parametrize("bits, cls", [(2, GridQuantizer), (3, ShiftQuantizer), (4, ShiftQuantizer),
                                       ("ternary", TernaryQuantizer)])
def test_make_quantizer_dispatch(bits, cls):
    spec = QuantSpec(bits, 8)
    init = rtn_quantize(torch.randn(4, 16, generator=_gen(1)), spec)
    q = make_quantizer(init, InitConfig(), _gen())
    assert type(q) is cls
    assert q.logits.shape[1:] == (4, 16)
    assert torch.equal(q.scale.detach(), init.scale)
    assert q.scale.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Hard rounding is the soft weight's limit (τ -> 0, κ large, no noise)


@pytest.mark.parametrize("bits", [2, 3, 4, "ternary"])
def test_hard_equals_soft_in_the_limit(bits):
    spec = QuantSpec(bits, 8)
    W = torch.randn(8, 32, generator=_gen(1))
    q = make_quantizer(rtn_quantize(W, spec), InitConfig(), _gen())
    with torch.no_grad():  # random logits, far from any tie at this κ/τ
        q.logits.copy_(0.01 * torch.randn(q.logits.shape, generator=_gen(4)))
    soft = q.soft(1e-3, 1e6, None, torch.float32).detach()
    hard = q.hard_result().dequantize()
    torch.testing.assert_close(soft, hard, rtol=0, atol=0)
    assert int(q.hard_codes().min()) >= spec.qmin and int(q.hard_codes().max()) <= spec.qmax


def test_shift_mask_hard_equals_soft_in_the_limit():
    spec = QuantSpec(3, 8)
    codes = _edge_codes(spec).repeat(2, 2)
    q = ShiftQuantizer(_init(codes, spec), InitConfig(shift_edge="mask"), _gen())
    with torch.no_grad():
        q.logits.copy_(0.01 * torch.randn(q.logits.shape, generator=_gen(4)))
    soft = q.soft(1e-3, 1e6, None, torch.float32).detach()
    torch.testing.assert_close(soft, q.hard_result().dequantize(), rtol=0, atol=0)
