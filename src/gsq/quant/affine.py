"""Affine quantizers: learn the integer codes of an existing affine assignment (method §13.1).

A GGUF block type stores, per sub-block g of a row, an affine map `value = scale_g · code - min_g`
with integer codes in the type's range (`gsq.gguf.Assignment`). `AffineWeight` is
that record in torch; `AffineShiftQuantizer` relaxes its codes with Gumbel-Softmax:

| type's codes            | candidates (K)                             | prior c̃ (minus its mean) |
|-------------------------|--------------------------------------------|--------------------------|
| <= 4 (Q2_K, TQ2_0, ...) | every code of the range                    | -(v_k - q)²/2            |
| more (Q3_K, Q4_K, Q5_*) | q + δ, δ ∈ {-2..2}, clipped into the range | -δ²/2                    |

with q the file's code, and logits ℓ = σ_init·(ε + α·c̃) as for the other quantizers (α = 6 unless
`InitConfig.init_strength` says otherwise). The soft weight is
`w = CategoricalSample(ℓ, scale, v) - min`: the autograd function gives `scale_g · Σ_k p_k v_k`
(group = sub-block, scales in fp32) and the frozen min is a constant subtracted outside it.

Scales are frozen by default (a parameter without gradient, which Lion skips). With
`train_scale`, they are trained and `snap` (e.g. Q2_K's 4-bit sub-block lattice) projects them in
`hard_result`, so the hard weight the trainer validates is exactly what the file will store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gsq.quant.quantizers import SHIFTS, InitConfig, _init_logits
from gsq.quant.sampler import CategoricalSample

FULL_RELAXATION_MAX_CODES = 4  # types with at most this many codes get every code as candidate
DEFAULT_STRENGTH = 6.0  # α of the paper's GGUF runs (Table 9)


@dataclass
class AffineWeight:
    """Integer codes and per-sub-block affine maps of one linear weight.

    codes: integer `(out, in)`, each in `code_range`; scale, min: float32 `(out, in // sub_block)`.
    `dequantize()` = scale · codes - min in float32, in the order gguf's decoders use.
    `train_scale` / `snap` tell a quantizer whether (and onto what) the scales may move.
    """

    codes: Tensor
    scale: Tensor
    min: Tensor
    sub_block: int
    code_range: tuple[int, int]
    train_scale: bool = False
    snap: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        out, cols = self.codes.shape
        if cols % self.sub_block:
            raise ValueError(f"sub-block {self.sub_block} does not divide input width {cols}")
        want = (out, cols // self.sub_block)
        for name in ("scale", "min"):
            if tuple(getattr(self, name).shape) != want:
                raise ValueError(f"{name} shape {tuple(getattr(self, name).shape)} != {want}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def levels(self) -> int:
        return self.code_range[1] - self.code_range[0] + 1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """`(out, in)`: scale · codes - min, computed in float32 then cast."""
        scale = self.scale.float().repeat_interleave(self.sub_block, dim=1)
        low = self.min.float().repeat_interleave(self.sub_block, dim=1)
        return (scale * self.codes.float() - low).to(dtype)

    def to(self, device: torch.device | str) -> AffineWeight:
        return AffineWeight(self.codes.to(device), self.scale.to(device), self.min.to(device),
                            self.sub_block, self.code_range, self.train_scale, self.snap)

    def with_codes(self, codes: Tensor, scale: Tensor | None = None) -> AffineWeight:
        """The same record with other codes (and scales)."""
        return AffineWeight(codes, self.scale if scale is None else scale, self.min,
                            self.sub_block, self.code_range, self.train_scale, self.snap)

    def make_quantizer(self, cfg: InitConfig, generator: torch.Generator) -> AffineShiftQuantizer:
        """The block loop's hook (`sequential._quantizers`): the quantizer for this record."""
        return AffineShiftQuantizer(self, cfg, generator)


def candidates(codes: Tensor, code_range: tuple[int, int],
               shift_edge: str = "clip") -> tuple[Tensor, Tensor | None, Tensor]:
    """Candidate codes, validity mask and centred prior for initial codes `(out, in)`.

    Full relaxation (<= 4 codes): values `(K, 1, 1)`, prior -(v_k - q)²/2 `(K, out, in)`.
    Shift: values clip(q + δ) `(5, out, in)`; with shift_edge "mask" the out-of-range shifts are
    invalid (mask `(5, out, in)`) and the prior is centred over the valid ones (as ShiftQuantizer).
    """
    lo, hi = code_range
    q = codes.float().unsqueeze(0)
    dtype = torch.int8 if lo >= -128 and hi <= 127 else torch.int16
    if hi - lo + 1 <= FULL_RELAXATION_MAX_CODES:
        values = torch.arange(lo, hi + 1, device=codes.device, dtype=torch.float32).view(-1, 1, 1)
        prior = -0.5 * (values - q) ** 2
        return values.to(dtype), None, prior - prior.mean(dim=0, keepdim=True)
    shifts = torch.tensor(SHIFTS, device=codes.device, dtype=torch.float32).view(-1, 1, 1)
    raw = q + shifts
    valid = (raw >= lo) & (raw <= hi)
    prior = (-0.5 * shifts**2).expand_as(raw)
    if shift_edge == "mask":
        prior = prior.masked_fill(~valid, 0.0)
        mean = prior.sum(0, keepdim=True) / valid.sum(0, keepdim=True)
        prior = torch.where(valid, prior - mean, torch.zeros_like(prior))
    elif shift_edge == "clip":
        prior, valid = prior - prior.mean(dim=0, keepdim=True), None
    else:
        raise ValueError(f"shift_edge must be 'clip' or 'mask'; got {shift_edge!r}")
    return raw.clamp(lo, hi).to(dtype), valid, prior


class AffineShiftQuantizer(nn.Module):
    """Logits over candidate codes of an `AffineWeight` (see the module doc).

    Same interface as `LogitQuantizer` for the trainer: `init`, `logits` `(K, out, in)`, `scale`
    `(out, in // sub_block)`, `soft(...)`, `hard_result()`.
    """

    def __init__(self, init: AffineWeight, cfg: InitConfig, generator: torch.Generator) -> None:
        super().__init__()
        if not torch.isfinite(init.scale).all() or not torch.isfinite(init.min).all():
            raise FloatingPointError("initial scales and mins must be finite")
        values, valid, prior = candidates(init.codes, init.code_range, cfg.shift_edge)
        alpha = cfg.init_strength if cfg.init_strength is not None else DEFAULT_STRENGTH
        self.init = init  # the file's assignment: candidate "epoch 0" of the best-epoch choice
        self.sub_block = init.sub_block
        self.logits = nn.Parameter(_init_logits(prior, cfg, alpha, generator))
        self.scale = nn.Parameter(init.scale.detach().clone().float(),
                                  requires_grad=init.train_scale)
        self.register_buffer("low", init.min.detach().float().repeat_interleave(init.sub_block, 1))
        self.register_buffer("values", values)
        self.register_buffer("valid", valid)
        if not torch.isfinite(self.logits).all():
            raise FloatingPointError("initial logits are not finite")

    def soft(self, tau: float, kappa: float, noise_seed: int, out_dtype: torch.dtype) -> Tensor:
        """`(out, in)`: scale · Σ_k p_k v_k - min with fresh noise `noise_seed`."""
        compute = torch.float64 if self.logits.dtype == torch.float64 else torch.float32
        w = CategoricalSample.apply(self.logits, self.scale, self.values, self.valid, kappa, tau,
                                    noise_seed, self.sub_block, None, compute)
        return (w - self.low.to(compute)).to(out_dtype)

    def hard_codes(self) -> Tensor:
        """`(out, in)` codes of each weight's argmax candidate (invalid shifts excluded)."""
        logits = self.logits.detach()
        if self.valid is not None:
            logits = logits.masked_fill(~self.valid, float("-inf"))
        values = self.values.expand(logits.shape)
        return values.gather(0, logits.argmax(dim=0, keepdim=True)).squeeze(0)

    def hard_result(self) -> AffineWeight:
        """The argmax codes with the current scales (snapped onto the type's lattice if trained)."""
        scale = self.scale.detach().clone()
        if self.scale.requires_grad and self.init.snap is not None:
            scale = self.init.snap(scale)
        return self.init.with_codes(self.hard_codes().to(self.init.codes.dtype), scale)
