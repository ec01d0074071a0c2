"""Seeded noise (method §4, §18.1): explicit seeds, no global RNG, replayable."""

from __future__ import annotations

import itertools

import torch

from gsq.quant.noise import (
    UNIFORM_EPS,
    derive_seed,
    gumbel_from_uniform,
    logistic_from_uniform,
    seeded_uniform,
)

CPU = torch.device("cpu")


def test_derive_seed_is_deterministic_and_63_bit():
    assert derive_seed(0, 1, 2, 3) == derive_seed(0, 1, 2, 3)
    seeds = [derive_seed(*p) for p in itertools.product(range(4), range(4), range(4), range(4))]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    # order matters, and so do negative and very large parts
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(-1) != derive_seed(1)
    assert 0 <= derive_seed(2**70, -(2**40)) < 2**63


def test_micro_batch_index_changes_the_noise():
    a = seeded_uniform((4, 8, 8), derive_seed(0, 0, 5, 0), CPU)
    b = seeded_uniform((4, 8, 8), derive_seed(0, 0, 5, 1), CPU)
    assert not torch.equal(a, b)


def test_seeded_uniform_replays_and_ignores_global_rng():
    torch.manual_seed(0)
    a = seeded_uniform((3, 5, 7), 123, CPU)
    torch.manual_seed(1)
    torch.rand(10)
    b = seeded_uniform((3, 5, 7), 123, CPU)
    assert torch.equal(a, b)
    assert a.dtype == torch.float32 and a.shape == (3, 5, 7)
    assert not torch.equal(a, seeded_uniform((3, 5, 7), 124, CPU))
    # the global RNG stream is not consumed
    torch.manual_seed(2)
    expected = torch.rand(4)
    torch.manual_seed(2)
    seeded_uniform((100,), 5, CPU)
    assert torch.equal(torch.rand(4), expected)


def test_uniforms_are_clamped_so_logs_are_finite():
    u = seeded_uniform((200_000,), 7, CPU)
    assert float(u.min()) >= UNIFORM_EPS and float(u.max()) <= 1.0 - UNIFORM_EPS
    assert torch.isfinite(gumbel_from_uniform(u)).all()
    assert torch.isfinite(logistic_from_uniform(u)).all()
    extremes = torch.tensor([UNIFORM_EPS, 1.0 - UNIFORM_EPS])
    assert torch.isfinite(gumbel_from_uniform(extremes)).all()
    assert torch.isfinite(logistic_from_uniform(extremes)).all()


def test_noise_formulas_and_moments():
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(gumbel_from_uniform(u), -torch.log(-torch.log(u)))
    torch.testing.assert_close(logistic_from_uniform(u), torch.log(u / (1 - u)))
    u = seeded_uniform((400_000,), 11, CPU).double()
    g = gumbel_from_uniform(u)
    assert abs(float(g.mean()) - 0.5772156649) < 0.01  # Euler–Mascheroni
    n = logistic_from_uniform(u)
    assert abs(float(n.mean())) < 0.01
    assert abs(float(n.var()) - torch.pi**2 / 3) < 0.05
