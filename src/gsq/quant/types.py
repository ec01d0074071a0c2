"""The records every stage hands on: what a quantized weight is.

Weight shape is always `(out_features, in_features)`, row-major, as in `torch.nn.Linear`. A group is
`group_size` contiguous input columns of one row that share one scale; scales have shape
`(out, in // group_size)`. The grid is symmetric-signed with no zero-point: `W_r = scale * codes`,
where a scale may be negative (method §5, "2-bit signed scale").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

TERNARY = "ternary"
SUPPORTED_BITS = (2, 3, 4, TERNARY)


@dataclass(frozen=True)
class QuantSpec:
    """Bit-width and group size of one quantized tensor."""

    bits: int | str  # 2, 3, 4 or "ternary" (codes in {-1, 0, 1})
    group_size: int  # input columns per scale

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of 2, 3, 4, ternary; got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group size must be a positive integer; got {self.group_size!r}")

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
        """Bits per parameter: code bits plus one 16-bit scale per group (method §13)."""
        return self.code_bits + 16.0 / self.group_size

    @property
    def label(self) -> str:
        if self.is_ternary:
            return f"ternary g{self.group_size}"
        return f"{self.bits}-bit g{self.group_size}"


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
    (stored as 16 bits).
    """

    codes: Tensor
    scale: Tensor
    spec: QuantSpec

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
        return QuantizedWeight(self.codes.to(device), self.scale.to(device), self.spec)
