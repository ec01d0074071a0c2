"""Learnable quantizers: logits and scales for one linear weight (method §5).

| quantizer          | bits    | logits `(K, out, in)`        | soft weight                      |
|--------------------|---------|------------------------------|----------------------------------|
| GridQuantizer      | 2       | 4: grid {-2, -1, 0, 1}       | s · Σ p_k v_k                    |
| ShiftQuantizer     | 3, 4    | 5: shifts δ ∈ {-2..2} of j⁰  | s · Σ p_k clip(j⁰ + δ_k)         |
| TernaryQuantizer   | ternary | 2: mask and sign             | s · m · b                        |

Logits start at ℓ = σ_init · (ε + α · c̃) with ε ~ N(0, 1) from an explicit generator and c̃ the
centred prior around the initial (GPTQ/RTN) code. Scales start from the initialiser's scales and are
trained too (they may be negative). `hard_result()` takes each weight's argmax.

With a GGUF target (`spec.target`) the scale parameter is a latent fp32 value: the sampler and
`hard_result()` see its projection onto the target's lattice (`gsq.quant.lattice`; straight-through
in the backward), so the hard weight the trainer validates is exactly what the GGUF file stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gsq.quant.grids import to_bf16_grid
from gsq.quant.lattice import Fp16Lattice, project_ste
from gsq.quant.sampler import categorical_sample, ternary_sample
from gsq.quant.target import target_type
from gsq.quant.types import QuantizedWeight, QuantSpec

SHIFTS = (-2, -1, 0, 1, 2)


@dataclass(frozen=True)
class InitConfig:
    """How logits are initialised around the initial codes."""

    init_std: float = 0.01  # σ_init: std of the logits' random part (paper App. A)
    init_strength: float | None = None  # α; None = 6 for 2/3/4-bit, 3 for ternary (paper)
    # 3/4-bit shifts past the grid edge: "clip" (paper) or "mask" (reference)
    shift_edge: str = "clip"
    logits_dtype: torch.dtype = torch.float32

    def strength(self, spec: QuantSpec) -> float:
        if self.init_strength is not None:
            return self.init_strength
        return 3.0 if spec.is_ternary else 6.0


def _init_logits(prior: Tensor, cfg: InitConfig, alpha: float,
                 generator: torch.Generator) -> Tensor:
    eps = torch.randn(prior.shape, generator=generator, dtype=torch.float32)
    return (cfg.init_std * (eps + alpha * prior.cpu())).to(prior.device, cfg.logits_dtype)


class LogitQuantizer(nn.Module):
    """Base class: a logits parameter, a scale parameter and the initial assignment."""

    def __init__(self, init: QuantizedWeight, logits: Tensor) -> None:
        super().__init__()
        self.spec = init.spec
        self.init = init  # the initial assignment, candidate "epoch 0" of the best-epoch selection
        self.logits = nn.Parameter(logits)
        self.scale = nn.Parameter(init.scale.detach().clone().float())
        self.lattice = _target_lattice(init)  # None without a GGUF target
        self.scale_dtype: torch.dtype | None = None if self.lattice is not None else torch.bfloat16

    def sample_scale(self) -> Tensor:
        """The scale the sampler sees: the parameter, or its lattice projection (straight-through
        gradient) with a GGUF target."""
        return self.scale if self.lattice is None else project_ste(self.scale, self.lattice)

    def soft(self, tau: float, kappa: float, noise_seed: int, out_dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def hard_codes(self) -> Tensor:
        raise NotImplementedError

    def hard_result(self) -> QuantizedWeight:
        """The argmax assignment with the current scales rounded to their 16-bit storage (or
        projected onto the target's lattice)."""
        scale = self.scale.detach()
        if self.lattice is not None:
            scale = self.lattice.project(scale.float())
        elif self.scale_dtype:
            scale = to_bf16_grid(scale.float())
        return QuantizedWeight(self.hard_codes(), scale.clone(), self.spec, lattice=self.lattice)


def _target_lattice(init: QuantizedWeight):
    """The lattice `init`'s scales were searched on; fp16 types need none handed over."""
    if init.spec.target is None:
        return None
    if init.lattice is not None:
        return init.lattice
    if not target_type(init.spec.target).is_k:
        return Fp16Lattice(init.spec)
    raise ValueError(f"a {init.spec.label} initial assignment must carry the scale lattice it was "
                     "searched on (from rtn_quantize / gptq_quantize)")


class GridQuantizer(LogitQuantizer):
    """2-bit full grid: 4 logits per weight over {-2, -1, 0, 1} (with a signed group scale)."""

    GRID = (-2.0, -1.0, 0.0, 1.0)

    def __init__(self, init: QuantizedWeight, cfg: InitConfig, generator: torch.Generator) -> None:
        values = torch.tensor(self.GRID, device=init.codes.device).view(-1, 1, 1)  # (4, 1, 1)
        prior = -0.5 * (values - init.codes.float().unsqueeze(0)) ** 2  # (4, out, in)
        prior = prior - prior.mean(dim=0, keepdim=True)
        super().__init__(init, _init_logits(prior, cfg, cfg.strength(init.spec), generator))
        self.register_buffer("values", values)

    def soft(self, tau, kappa, noise_seed, out_dtype):
        return categorical_sample(self.logits, self.sample_scale(), self.values, None, kappa, tau,
                                  noise_seed, self.spec.group_size, self.scale_dtype, out_dtype,
                                  accumulate_grad=True)

    def hard_codes(self) -> Tensor:
        return self.values.flatten()[self.logits.detach().argmax(dim=0)].to(torch.int8)


class ShiftQuantizer(LogitQuantizer):
    """3/4-bit local shift: 5 logits per weight over δ ∈ {-2..2} around the initial code j⁰."""

    def __init__(self, init: QuantizedWeight, cfg: InitConfig, generator: torch.Generator) -> None:
        spec = init.spec
        shifts = torch.tensor(SHIFTS, device=init.codes.device, dtype=torch.float32).view(-1, 1, 1)
        raw = init.codes.float().unsqueeze(0) + shifts  # (5, out, in)
        valid = (raw >= spec.qmin) & (raw <= spec.qmax)
        prior = (-0.5 * shifts**2).expand_as(raw)
        if cfg.shift_edge == "mask":
            prior = prior.masked_fill(~valid, 0.0)
            mean = prior.sum(0, keepdim=True) / valid.sum(0, keepdim=True)
            prior = torch.where(valid, prior - mean, torch.zeros_like(prior))
        elif cfg.shift_edge == "clip":
            prior = prior - prior.mean(dim=0, keepdim=True)
        else:
            raise ValueError(f"shift_edge must be 'clip' or 'mask'; got {cfg.shift_edge!r}")
        super().__init__(init, _init_logits(prior, cfg, cfg.strength(spec), generator))
        self.register_buffer("values", raw.clamp(spec.qmin, spec.qmax).to(torch.int8))
        self.register_buffer("valid", valid if cfg.shift_edge == "mask" else None)

    def soft(self, tau, kappa, noise_seed, out_dtype):
        return categorical_sample(self.logits, self.sample_scale(), self.values, self.valid, kappa,
                                  tau,
                                  noise_seed, self.spec.group_size, self.scale_dtype, out_dtype,
                                  accumulate_grad=True)

    def hard_codes(self) -> Tensor:
        logits = self.logits.detach()
        if self.valid is not None:
            logits = logits.masked_fill(~self.valid, float("-inf"))
        return self.values.gather(0, logits.argmax(dim=0, keepdim=True)).squeeze(0)


class TernaryQuantizer(LogitQuantizer):
    """Ternary: a mask logit and a sign logit per weight, w = s · m · b, codes in {-1, 0, 1}."""

    def __init__(self, init: QuantizedWeight, cfg: InitConfig, generator: torch.Generator) -> None:
        q = init.codes.float()
        mask_prior = torch.where(q != 0, 1.0, -1.0)
        sign_prior = q  # +1 / -1 for non-zero codes, 0 (undecided) for zeros
        prior = torch.stack([mask_prior, sign_prior])  # (2, out, in)
        super().__init__(init, _init_logits(prior, cfg, cfg.strength(init.spec), generator))

    def soft(self, tau, kappa, noise_seed, out_dtype):
        return ternary_sample(self.logits, self.sample_scale(), kappa, tau, noise_seed,
                              self.spec.group_size, self.scale_dtype, out_dtype,
                              accumulate_grad=True)

    def hard_codes(self) -> Tensor:
        # Paper Alg. 2: mask = [ℓ_m >= 0], sign = +1 iff ℓ_b >= 0.
        logits = self.logits.detach()
        mask = logits[0] >= 0
        sign = torch.where(logits[1] >= 0, 1, -1)
        return (mask * sign).to(torch.int8)


def make_quantizer(init: QuantizedWeight, cfg: InitConfig,
                   generator: torch.Generator) -> LogitQuantizer:
    """The quantizer for `init.spec.bits`, initialised around `init`
    (checked finite, pitfall P3)."""
    if not torch.isfinite(init.scale).all() or (init.scale == 0).any():
        raise FloatingPointError("initial scales must be finite and non-zero")
    if init.spec.is_ternary:
        quantizer: LogitQuantizer = TernaryQuantizer(init, cfg, generator)
    elif init.spec.bits == 2:
        quantizer = GridQuantizer(init, cfg, generator)
    else:
        quantizer = ShiftQuantizer(init, cfg, generator)
    if not torch.isfinite(quantizer.logits).all():
        raise FloatingPointError("initial logits are not finite")
    return quantizer
