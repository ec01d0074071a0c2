"""Running-mean layer Hessian H = (2/n) Σ x xᵀ and its damping (method §2, §7)."""

from __future__ import annotations

import torch
from torch import Tensor


class HessianAccumulator:
    """Accumulates H over batches of layer inputs `(..., in)` as a running mean, in fp32."""

    def __init__(self, n_features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(n_features, n_features, dtype=torch.float32, device=device)
        self.n_samples = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)  # (tokens, in)
        n = x.shape[0]
        total = self.n_samples + n
        self.H.mul_(self.n_samples / total)
        self.H.addmm_(x.T, x, alpha=2.0 / total)
        self.n_samples = total


def damp_hessian(H: Tensor, percdamp: float = 0.1) -> tuple[Tensor, Tensor]:
    """Return (damped H, dead-column mask): dead columns get H_ii = 1,
    then H += percdamp·mean(diag)·I."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    return H, dead
