"""Seeded noise for the Gumbel-Softmax sampler (method §4, §18.1).

Noise is never drawn from global RNG state. Every forward call gets an explicit `noise_seed`,
derived from (run seed, block, stage, quantizer, step, micro-batch), and draws its uniforms from a
fresh `torch.Generator` on the logits' device (method §18.1, option A). The backward rebuilds the
same generator and so replays the same noise without storing it. This works on CPU and CUDA alike;
the streams differ between device types, so runs reproduce per device type.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
# Uniforms are clamped to [EPS, 1 - EPS] so that log(u) and log(1 - u) stay finite in fp32.
UNIFORM_EPS = 1e-7


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """Hash integer parts (run seed, block, stage id, quantizer id, step, micro, ...)
    to a 63-bit seed."""
    h = 0x2545F4914F6CDD1D
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h & ((1 << 63) - 1)


def seeded_uniform(shape: tuple[int, ...], noise_seed: int, device: torch.device) -> Tensor:
    """fp32 uniforms in [EPS, 1 - EPS] from a generator seeded with `noise_seed` on `device`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(noise_seed)
    u = torch.rand(shape, generator=gen, dtype=torch.float32, device=device)
    return u.clamp_(UNIFORM_EPS, 1.0 - UNIFORM_EPS)


def gumbel_from_uniform(u: Tensor) -> Tensor:
    """Gumbel(0, 1) noise g = -log(-log u)."""
    return -torch.log(-torch.log(u))


def logistic_from_uniform(u: Tensor) -> Tensor:
    """Logistic noise n = log(u / (1 - u)), the difference of two Gumbels (binary relaxation)."""
    return torch.log(u) - torch.log1p(-u)
