"""The records every stage hands on: what a quantized weight is.

Weight shape is always `(out_features, in_features)`, row-major, as in `torch.nn.Linear`. A group is
`group_size` contiguous input columns of one row that share one scale; scales have shape
`(out, in // group_size)`. The grid is symmetric-signed with no zero-point: `W_r = scale * codes`,
where a scale may be negative (method §5, "2-bit signed scale").

A spec may name a GGUF `target` type (e.g. "Q2_K"): the run then optimises under that type's own
constraints (code grid, scale unit, scale lattice; `gsq.quant.target`), so the scales lie on the
type's lattice instead of the bf16 grid and the GGUF file holds the weight exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gsq.gguf import TYPES as GGUF_TYPES

TERNARY = "ternary"
SUPPORTED_BITS = (2, 3, 4, TERNARY)
# How RTN/GPTQ pick a group's scale (`gsq.quant.grids.search_group_scales`): "mse" tries 80 shrink
# factors p of max|x| (both signs on asymmetric grids) for the least sum |s*q - x|^2.4; "absmax"
# takes p = 1 only, 80x less work, for models whose search would take hours on a CPU.
SCALE_SEARCHES = ("mse", "absmax")


@dataclass(frozen=True)
class QuantSpec:
    """Bit-width and group size of one quantized tensor, and optionally its GGUF target type."""

    bits: int | str  # 2, 3, 4 or "ternary" (codes in {-1, 0, 1})
    group_size: int  # input columns per scale
    # GGUF type the scales are fitted to ("Q2_K", "Q4_0", ...); None: bf16 scales (the default)
    target: str | None = None
    scale_search: str = "mse"  # one of SCALE_SEARCHES

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of 2, 3, 4, ternary; got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group size must be a positive integer; got {self.group_size!r}")
        if self.scale_search not in SCALE_SEARCHES:
            raise ValueError(f"scale search must be one of {', '.join(SCALE_SEARCHES)}; "
                             f"got {self.scale_search!r}")
        if self.target is not None:
            object.__setattr__(self, "target", check_target_spec(self))

    @property
    def is_ternary(self) -> bool:
        return self.bits == TERNARY

    @property
    def qmin(self) -> int:
        return -1 if self.is_ternary else -(2 ** (int(self.bits) - 1))

    @property
    def qmax(self) -> int:
        return 1 if self.is_ternary else 2 ** (int(self.bits) - 1) - 1

    @property
    def levels(self) -> int:
        """Number of grid points: 2**bits, or 3 for ternary."""
        return self.qmax - self.qmin + 1

    @property
    def code_bits(self) -> float:
        """Information per weight: log2(levels) (log2 3 ~ 1.585 for ternary)."""
        return math.log2(self.levels)

    @property
    def bpp(self) -> float:
        """Bits per parameter: code bits plus one 16-bit scale per group (method §13); with a
        GGUF target, that type's bits per weight."""
        if self.target is not None:
            return GGUF_TYPES[self.target].bpw
        return self.code_bits + 16.0 / self.group_size

    @property
    def label(self) -> str:
        grid = "ternary" if self.is_ternary else f"{self.bits}-bit"
        return f"{grid} g{self.group_size}" + (f" ({self.target})" if self.target else "")


def target_names() -> tuple[str, ...]:
    """The GGUF types a run can target (`--target gguf:TYPE`): those with a target grid."""
    return tuple(name for name, t in GGUF_TYPES.items() if t.target_bits is not None)


def parse_target(value: str) -> str:
    """'gguf:q2_k' or 'Q2_K' -> 'Q2_K'; ValueError naming the supported types otherwise."""
    text = str(value).strip()
    fmt, sep, name = text.partition(":")
    if sep and fmt.strip().lower() != "gguf":
        raise ValueError(f"only GGUF targets are supported (gguf:TYPE); got {value!r}")
    name = (name if sep else text).strip().upper()
    if name not in target_names():
        raise ValueError(f"unknown GGUF target {value!r}; supported: {', '.join(target_names())}")
    return name


def check_target_spec(spec: QuantSpec) -> str:
    """The normalised target name of `spec`; ValueError if its grid or group contradict it (the
    group must be the type's scale unit, the grid no wider than the type holds)."""
    t = GGUF_TYPES[parse_target(spec.target)]
    if spec.group_size != t.sub_block:
        raise ValueError(f"GGUF target {t.name} stores one scale per {t.sub_block} columns; "
                         f"got group size {spec.group_size}")
    if QuantSpec(spec.bits, 1).levels > QuantSpec(t.max_bits, 1).levels:
        widest = QuantSpec(t.max_bits, 1).label.split()[0]
        raise ValueError(f"GGUF target {t.name} holds at most {widest} codes; got bits "
                         f"{spec.bits}")
    return t.name


def parse_bits(value: str | int) -> int | str:
    """'2' -> 2, 'ternary' -> 'ternary'; anything else raises ValueError."""
    text = str(value).strip().lower()
    if text in ("ternary", "1.58", "t"):
        return TERNARY
    if text in ("2", "3", "4"):
        return int(text)
    raise ValueError(f"bits must be one of 2, 3, 4, ternary; got {value!r}")


@dataclass
class QuantizedWeight:
    """Integer codes and per-group scales of one linear weight.

    codes: int8 `(out, in)`, each in [spec.qmin, spec.qmax].
    scale: float32 `(out, in // group_size)`, values exactly representable in bfloat16
    (stored as 16 bits); with a `spec.target`, values on that GGUF type's scale lattice instead
    (fp16 values, or d*k per K-quant super-block: not always bf16 values, stored as float32).
    """

    codes: Tensor
    scale: Tensor
    spec: QuantSpec
    # the target's scale lattice the scales were chosen on (`gsq.quant.lattice`), handed from the
    # initialiser to the quantizer; not saved, and None without a target
    lattice: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        out, cols = self.codes.shape
        g = self.spec.group_size
        if cols % g != 0:
            raise ValueError(f"group size {g} does not divide input width {cols}")
        if tuple(self.scale.shape) != (out, cols // g):
            raise ValueError(f"scale shape {tuple(self.scale.shape)} != {(out, cols // g)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W_r = scale * codes, `(out, in)`, computed in fp32 then cast."""
        scale = self.scale.float().repeat_interleave(self.spec.group_size, dim=1)
        return (scale * self.codes.float()).to(dtype)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        lattice = self.lattice.to(device) if self.lattice is not None else None
        return QuantizedWeight(self.codes.to(device), self.scale.to(device), self.spec, lattice)
