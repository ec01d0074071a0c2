"""AffineShiftQuantizer: candidates, init, exact closed-form gradients, frozen or trained scales,
and training through the GSQ trainer (method §13.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gsq.gguf import decode_assignment
from gsq.quant.affine import AffineShiftQuantizer, AffineWeight, candidates
from gsq.quant.grids import expand_scale
from gsq.quant.quantizers import InitConfig
from gsq.quant.sampler import categorical_probs
from gsq.quant.trainer import TrainConfig, train_quantizers


def _gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _record(out=4, cols=64, sub=16, code_range=(0, 15), seed=0, **kw) -> AffineWeight:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = code_range
    codes = torch.randint(lo, hi + 1, (out, cols), generator=gen, dtype=torch.int16)
    scale = torch.rand(out, cols // sub, generator=gen) * 0.1 + 0.01
    low = torch.rand(out, cols // sub, generator=gen) * 0.05
    return AffineWeight(codes, scale, low, sub, code_range, **kw)


def test_full_relaxation_for_four_codes_and_clipped_shifts_otherwise():
    codes = torch.tensor([[0, 3]], dtype=torch.int16)
    values, valid, prior = candidates(codes, (0, 3))
    assert values.flatten().tolist() == [0, 1, 2, 3] and valid is None
    assert prior.shape == (4, 1, 2)
    torch.testing.assert_close(prior.sum(0), torch.zeros(1, 2))
    assert prior[:, 0, 0].argmax() == 0 and prior[:, 0, 1].argmax() == 3
    values, valid, prior = candidates(torch.tensor([[0, 7, 15]], dtype=torch.int16), (0, 15))
    assert values[:, 0].T.tolist() == [[0, 0, 0, 1, 2], [5, 6, 7, 8, 9], [13, 14, 15, 15, 15]]
    assert valid is None and prior[:, 0, 0].tolist() == prior[:, 0, 1].tolist()
    _, valid, prior = candidates(torch.tensor([[0]], dtype=torch.int16), (0, 15), "mask")
    assert valid[:, 0, 0].tolist() == [False, False, True, True, True]
    assert prior[:, 0, 0][~valid[:, 0, 0]].eq(0).all()
    torch.testing.assert_close(prior[valid].sum(), torch.tensor(0.0))


def test_logits_start_at_the_paper_init_around_the_file_codes():
    rec = _record()
    q = AffineShiftQuantizer(rec, InitConfig(), _gen())
    _, _, prior = candidates(rec.codes, rec.code_range)
    eps = torch.randn(prior.shape, generator=_gen())
    torch.testing.assert_close(q.logits.detach(), 0.01 * (eps + 6.0 * prior))
    assert q.hard_result().codes.dtype == rec.codes.dtype


def test_dequantize_matches_the_gguf_decoder_bit_for_bit():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (3, 144), dtype=np.uint8)  # one Q4_K super-block per row
    data[:, :4] = np.frombuffer(np.array([0.01, 0.002] * 3, "<f2").tobytes(), np.uint8).reshape(3,
                                                                                               4)
    a = decode_assignment("Q4_K", data, 256)
    rec = AffineWeight(torch.from_numpy(a.codes), torch.from_numpy(a.scale),
                       torch.from_numpy(a.min), a.sub_block, a.code_range)
    assert np.array_equal(rec.dequantize().numpy(), a.dequantize())


@pytest.mark.parametrize("code_range", [(0, 3), (-8, 7)])
def test_closed_form_gradients_match_autograd_in_float64(code_range):
    rec = _record(code_range=code_range, train_scale=True)
    q = AffineShiftQuantizer(rec, InitConfig(), _gen())
    q.logits = nn.Parameter(q.logits.detach().double() * 30)  # spread the probabilities
    q.scale = nn.Parameter(q.scale.detach().double())
    G = torch.randn(rec.shape, generator=_gen(3), dtype=torch.float64)
    kappa, tau, seed = 150.0, 1.3, 1234
    (q.soft(tau, kappa, seed, torch.float64) * G).sum().backward()
    logits = q.logits.detach().clone().requires_grad_(True)
    scale = q.scale.detach().clone().requires_grad_(True)
    p = categorical_probs(logits, q.valid, kappa, tau, seed)
    w = expand_scale(scale, rec.sub_block) * (p * q.values.double()).sum(0) - q.low.double()
    (w * G).sum().backward()
    torch.testing.assert_close(q.logits.grad, logits.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q.scale.grad, scale.grad, rtol=1e-12, atol=1e-12)


def test_frozen_scales_get_no_gradient_and_trained_ones_are_snapped():
    frozen = AffineShiftQuantizer(_record(), InitConfig(), _gen())
    frozen.soft(1.0, 100.0, 5, torch.float32).sum().backward()
    assert frozen.scale.grad is None and frozen.logits.grad is not None
    assert torch.equal(frozen.hard_result().scale, frozen.init.scale)
    trained = AffineShiftQuantizer(_record(train_scale=True, snap=lambda s: s.round()),
                                   InitConfig(), _gen())
    trained.soft(1.0, 100.0, 5, torch.float32).sum().backward()
    assert trained.scale.grad is not None
    assert torch.equal(trained.hard_result().scale, trained.scale.detach().round())


class _Linear:
    """MSE of x Wᵀ against a full-precision W_f on correlated inputs (AR(1) over the columns, so
    rounding to nearest is not optimal), on train and held-out rows."""

    def __init__(self, W_f, seed=0, rho=0.9):
        gen = torch.Generator().manual_seed(seed)
        Z = torch.randn(48, 8, W_f.shape[1], generator=gen)
        X = torch.empty_like(Z)
        X[..., 0] = Z[..., 0]
        for j in range(1, Z.shape[-1]):
            X[..., j] = rho * X[..., j - 1] + (1 - rho**2) ** 0.5 * Z[..., j]
        self.X_train, self.X_val, self.W_f = X[:32], X[32:], W_f
        self.n_train, self.dtype = 32, torch.float32

    def loss(self, weights, indices):
        x = self.X_train[indices]
        return ((x @ (weights["w"] - self.W_f).T) ** 2).mean()

    def val_loss(self, weights):
        return float(((self.X_val @ (weights["w"] - self.W_f).T) ** 2).mean())


def test_training_improves_on_the_file_codes_and_stays_in_the_format():
    """A Q4_K-like affine assignment rounded to nearest is improved on held-out data by GSQ."""
    gen = torch.Generator().manual_seed(1)
    W_f = torch.randn(16, 64, generator=gen) * 0.05
    sub = 32
    lo = W_f.view(16, -1, sub).amin(-1)
    scale = (W_f.view(16, -1, sub).amax(-1) - lo) / 15
    codes = torch.round((W_f - expand_scale(lo, sub)) / expand_scale(scale, sub)).clamp(0, 15)
    init = AffineWeight(codes.to(torch.int16), scale, -lo, sub, (0, 15))
    quantizer = AffineShiftQuantizer(init, InitConfig(), _gen())
    run = train_quantizers({"w": quantizer}, _Linear(W_f), TrainConfig(epochs=10, batch_size=8,
                                                                       micro_batch_size=4), seed=0)
    result = run.results["w"]
    assert isinstance(result, AffineWeight) and run.best_val < run.init_val
    assert result.codes.min() >= 0 and result.codes.max() <= 15
    assert torch.equal(result.scale, scale) and torch.equal(result.min, -lo)
    assert (result.codes - init.codes).abs().max() <= 2  # the ±2 shift window
