"""Round-to-nearest with searched signed group scales (method §7)."""

from __future__ import annotations

import pytest
import torch

from gsq.quant.grids import search_group_scales
from gsq.quant.rtn import rtn_quantize
from gsq.quant.types import QuantSpec

BITS = [2, 3, 4, "ternary"]


def _W(out=16, cols=64, seed=0):
    return torch.randn(out, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("bits", BITS)
def test_rtn_codes_in_range_and_shapes(bits):
    spec = QuantSpec(bits, 16)
    qw = rtn_quantize(_W(), spec)
    assert qw.codes.dtype == torch.int8 and qw.codes.shape == (16, 64)
    assert qw.scale.shape == (16, 4) and qw.scale.dtype == torch.float32
    assert int(qw.codes.min()) >= spec.qmin and int(qw.codes.max()) <= spec.qmax
    assert torch.equal(qw.scale, search_group_scales(_W().view(16, 4, 16), spec))


@pytest.mark.parametrize("bits", BITS)
def test_rtn_codes_are_nearest_for_their_scale(bits):
    """Each code is the grid point nearest to the weight, given the group's scale."""
    spec = QuantSpec(bits, 16)
    W = _W(seed=1)
    qw = rtn_quantize(W, spec)
    s = qw.scale.repeat_interleave(16, dim=1)
    err = (qw.dequantize() - W).abs()
    grid = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float32).view(-1, 1, 1)
    best = (s.unsqueeze(0) * grid - W.unsqueeze(0)).abs().amin(0)
    torch.testing.assert_close(err, best, rtol=0, atol=1e-7)


def test_rtn_error_is_small_and_falls_with_bits():
    W = _W(64, 256, seed=2)
    rel = {}
    for bits in BITS:
        W_r = rtn_quantize(W, QuantSpec(bits, 32)).dequantize()
        rel[bits] = float(((W_r - W) ** 2).sum() / (W**2).sum())
    assert rel[4] < 0.015
    assert rel[3] < 0.05
    assert rel[2] < 0.2
    assert rel[4] < rel[3] < rel[2] < rel["ternary"] < 0.35


def test_rtn_exact_on_grid_weights():
    # 2-bit codes with -2 in every group: max|x| = 0.5 and p = 0.75 gives s = 0.25 exactly
    spec = QuantSpec(2, 8)
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(-2, 2, (4, 16), generator=gen)
    codes[:, 0] = -2
    codes[:, 8] = -2
    W = codes.float() * 0.25
    qw = rtn_quantize(W, spec)
    assert torch.equal(qw.dequantize(), W)
    assert torch.equal(qw.codes, codes.to(torch.int8))


def test_rtn_rejects_bad_group_size():
    with pytest.raises(ValueError, match="does not divide"):
        rtn_quantize(_W(4, 60), QuantSpec(2, 16))


def test_rtn_bf16_input():
    W = _W().to(torch.bfloat16)
    qw = rtn_quantize(W, QuantSpec(4, 16))
    rel = float(((qw.dequantize() - W.float()) ** 2).sum() / (W.float() ** 2).sum())
    assert rel < 0.02
