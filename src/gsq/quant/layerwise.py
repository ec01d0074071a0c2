"""Quadratic layer loss tr(ΔW H ΔWᵀ) for the Q/K stage and the ternary warm-up (method §7).

‖(W - W̃)·L‖²_F with H = L Lᵀ equals tr(ΔW H ΔWᵀ): the layer's expected output error, computed from
the Hessian alone ("full batch"), normalised by tr(W H Wᵀ) so that it reads as a relative error.
"""

from __future__ import annotations

import torch
from torch import Tensor


def quadratic_error(W_q: Tensor, W_f: Tensor, H: Tensor) -> Tensor:
    """tr((W_q - W_f) H (W_q - W_f)ᵀ) for weights `(out, in)` and H `(in, in)`."""
    dW = W_q.float() - W_f
    return ((dW @ H) * dW).sum()


class QuadraticObjective:
    """Objective over one linear `name`: train on H_train, validate on H_val (held-out inputs)."""

    def __init__(self, name: str, W_f: Tensor, H_train: Tensor, H_val: Tensor,
                 steps_per_epoch: int = 1) -> None:
        # Every step sees the whole calibration set through H ("full batch"); an "epoch" is
        # `steps_per_epoch` such steps, after which the trainer checks the held-out loss.
        self.n_train = steps_per_epoch
        self.name = name
        self.W_f = W_f.detach().float()
        self.H_train, self.H_val = H_train.float(), H_val.float()
        self.dtype = torch.float32
        # relative to the error of the all-zero weight; 1 when that is 0 (an all-zero layer)
        zero = torch.zeros_like(self.W_f)
        self._norm_train = float(quadratic_error(zero, self.W_f, self.H_train)) or 1.0
        self._norm_val = float(quadratic_error(zero, self.W_f, self.H_val)) or 1.0

    def loss(self, weights: dict[str, Tensor], indices: Tensor) -> Tensor:
        return quadratic_error(weights[self.name], self.W_f, self.H_train) / self._norm_train

    @torch.no_grad()
    def val_loss(self, weights: dict[str, Tensor]) -> float:
        return float(quadratic_error(weights[self.name], self.W_f, self.H_val)) / self._norm_val
