"""Signed MSE-shrink scale search, bf16 scale grid, rounding helpers (method §5, §7)."""

from __future__ import annotations

import pytest
import torch

from gsq.quant.grids import (
    SEARCH_NORM,
    SHRINK_FACTORS,
    expand_scale,
    group_view,
    round_to_grid,
    search_group_scales,
    to_bf16_grid,
)
from gsq.quant.types import QuantSpec

SPECS = [QuantSpec(2, 16), QuantSpec(3, 16), QuantSpec(4, 16), QuantSpec("ternary", 16)]


def _groups(rows=8, n_groups=4, g=16, seed=0):
    return torch.randn(rows, n_groups, g, generator=torch.Generator().manual_seed(seed))


def _reference_search(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Direct transcription of method §7: loop over p and both signs, keep the first best."""
    rows, n_groups, _ = x.shape
    out = torch.empty(rows, n_groups)
    symmetric = spec.qmin == -spec.qmax
    for r in range(rows):
        for j in range(n_groups):
            grp = x[r, j].float()
            xmax = float(grp.abs().max()) or 1.0
            best, best_err = None, float("inf")
            for p in SHRINK_FACTORS:
                for sign in ((1.0,) if symmetric else (1.0, -1.0)):
                    s = to_bf16_grid(torch.tensor(sign * 2.0 * p * xmax / (spec.levels - 1)))
                    q = torch.clamp(torch.round(grp / s), spec.qmin, spec.qmax)
                    err = float((s * q - grp).abs().pow(SEARCH_NORM).sum())
                    if err < best_err:
                        best, best_err = s, err
            out[r, j] = best
    return out


def test_shrink_factors():
    assert len(SHRINK_FACTORS) == 80
    assert SHRINK_FACTORS[0] == 1.0 and SHRINK_FACTORS[-1] == 0.21


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_search_matches_reference_loop(spec):
    x = _groups(rows=3, n_groups=2, seed=1)
    torch.testing.assert_close(search_group_scales(x, spec), _reference_search(x, spec),
                               rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_search_returns_scales_on_the_bf16_grid(spec):
    s = search_group_scales(_groups() * 0.013, spec)
    assert s.shape == (8, 4) and s.dtype == torch.float32
    assert torch.equal(s, s.to(torch.bfloat16).float())
    assert torch.isfinite(s).all() and (s != 0).all()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_search_is_no_worse_than_plain_absmax(spec):
    x = _groups(seed=2)
    s = search_group_scales(x, spec).unsqueeze(-1)
    s0 = to_bf16_grid(2.0 * x.abs().amax(-1, keepdim=True) / (spec.levels - 1))
    err = (s * round_to_grid(x, s, spec) - x).abs().pow(SEARCH_NORM).sum(-1)
    err0 = (s0 * round_to_grid(x, s0, spec) - x).abs().pow(SEARCH_NORM).sum(-1)
    assert (err <= err0 + 1e-6).all()
    assert (err < err0).any()


def test_two_bit_search_picks_a_negative_scale_for_mostly_positive_groups():
    # Values in [0, 2]: the grid {-1, 0, 1, 2}·|s| (negative s) holds them exactly with |s| = 1;
    # {-2, -1, 0, 1}·s (positive s) must clip the largest values.
    x = torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 0.0, 2.0, 1.0]).view(1, 1, 8)
    spec = QuantSpec(2, 8)
    s = search_group_scales(x, spec)
    assert float(s) < 0
    assert float(s) == -1.0
    q = round_to_grid(x, s.unsqueeze(-1), spec)
    assert torch.equal(s.unsqueeze(-1) * q, x)
    # mirrored: mostly negative values keep a positive scale
    s_neg = search_group_scales(-x, spec)
    assert float(s_neg) == 1.0


def test_two_bit_search_uses_both_signs_on_random_data():
    x = _groups(rows=32, n_groups=4, seed=3)
    x[:16] = x[:16].abs() + 0.5  # mostly positive rows
    x[16:] = -(x[16:].abs() + 0.5)
    s = search_group_scales(x, QuantSpec(2, 16))
    assert (s[:16] < 0).all() and (s[16:] > 0).all()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_symmetric_grids_only_use_positive_scales(spec):
    s = search_group_scales(_groups(seed=4), spec)
    if spec.qmin == -spec.qmax:
        assert (s > 0).all()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_all_zero_group_gets_finite_nonzero_scale(spec):
    x = torch.zeros(2, 3, 16)
    x[1, 2] = torch.linspace(-1, 1, 16)
    s = search_group_scales(x, spec)
    assert torch.isfinite(s).all() and (s != 0).all()
    assert (round_to_grid(x[0], s[0].unsqueeze(-1), spec) == 0).all()


def test_search_chunking_does_not_change_the_result():
    x = _groups(seed=5)
    spec = QuantSpec(2, 16)
    assert torch.equal(search_group_scales(x, spec), search_group_scales(x, spec, max_elements=100))


def test_round_to_grid_clamps():
    spec = QuantSpec(3, 4)
    x = torch.tensor([-100.0, -4.4, -0.49, 0.5, 2.6, 100.0])
    assert round_to_grid(x, torch.tensor(1.0), spec).tolist() == [-4, -4, 0, 0, 3, 3]


def test_to_bf16_grid_is_idempotent_and_nearest():
    s = torch.tensor([0.0123456, -3.3e-3, 1.0, 7e-8])
    r = to_bf16_grid(s)
    assert r.dtype == torch.float32
    assert torch.equal(to_bf16_grid(r), r)
    torch.testing.assert_close(r, s, rtol=2**-8, atol=0)


def test_group_view_and_expand_scale():
    W = torch.arange(24.0).view(2, 12)
    g = group_view(W, 4)
    assert g.shape == (2, 3, 4)
    assert torch.equal(g[1, 2], torch.tensor([20.0, 21.0, 22.0, 23.0]))
    with pytest.raises(ValueError, match="does not divide"):
        group_view(W, 5)
    scale = torch.tensor([[1.0, 2.0, 3.0]])
    assert expand_scale(scale, 2).tolist() == [[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]]


def _search_error(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-group sum |s*q - x|^2.4 of scales `(rows, n_groups)` on groups `x`."""
    q = round_to_grid(x, scale.unsqueeze(-1), spec)
    return (scale.unsqueeze(-1) * q - x).abs().pow(2.4).sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4, "ternary"])
def test_absmax_search_takes_max_abs_with_the_better_sign(bits):
    """"absmax": s = ±2·max|x|/(levels-1) on the bf16 grid, the sign with the lesser error (one
    sign on the symmetric ternary grid); never better than the full search, which contains it."""
    x = _groups(seed=7)
    absmax, mse = QuantSpec(bits, 16, scale_search="absmax"), QuantSpec(bits, 16)
    s = search_group_scales(x, absmax)
    base = x.abs().amax(-1) * 2.0 / (absmax.levels - 1)
    plus, minus = base.to(torch.bfloat16).float(), (-base).to(torch.bfloat16).float()
    if absmax.qmin == -absmax.qmax:
        assert torch.equal(s, plus)
    else:
        better_minus = _search_error(x, minus, absmax) < _search_error(x, plus, absmax)
        assert torch.equal(s, torch.where(better_minus, minus, plus))
    err_mse = _search_error(x, search_group_scales(x, mse), mse)
    assert (err_mse <= _search_error(x, s, absmax)).all()
    assert (err_mse < _search_error(x, s, absmax)).any()  # the shrinks do find better scales


def test_unknown_scale_search_is_refused():
    with pytest.raises(ValueError, match="scale search"):
        QuantSpec(2, 16, scale_search="minmax")
