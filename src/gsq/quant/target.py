"""GGUF target types: the constraints a run optimises under with `--target gguf:TYPE`
(formats.md B.4-B.6; issue 3).

A target fixes, for one tensor, everything the GGUF type can store exactly:

| type  | grid (default) | group = scale unit | row unit | scales stored as                        |
|-------|----------------|--------------------|----------|-----------------------------------------|
| Q4_0  | 4-bit          | 32                 | 32       | one fp16 d per block                    |
| Q2_0  | 2-bit          | 64                 | 64       | one fp16 d per block                    |
| TQ1_0 | ternary        | 256                | 256      | one fp16 d per block                    |
| TQ2_0 | ternary        | 256                | 256      | one fp16 d per block                    |
| Q2_K  | 2-bit          | 16                 | 256      | d*k, fp16 d per 256, 0 <= k <= 15, mins |
| Q3_K  | 3-bit          | 16                 | 256      | d*k, fp16 d per 256, -32 <= k <= 31     |
| Q4_K  | 4-bit          | 32                 | 256      | d*k, fp16 d per 256, 0 <= k <= 63, mins |

A narrower grid than the default is allowed where the type holds it (our grids nest: ternary in
2-bit in 3-bit in 4-bit), a wider one or another group size is refused. The two affine types
(Q2_K, Q4_K: `w = d*k*q - dmin*m`) are used only on their symmetric sub-lattice: a group stores
our signed grid `s*c` through the min field (`q = sign(s)*c + z`, `dmin*m = z*|s|`, B.5), so the
codes stay the symmetric-signed codes of `QuantSpec` and no free per-group offset is trained.

Rows that are not whole blocks of the type (K and TQ types need `in_features % 256 == 0`;
SmolLM2's 576-wide inputs are not) get a fallback type: the user's, or llama.cpp's rule, which
stores such tensors of Q2_K/Q3_K/TQ1_0/TQ2_0 models as Q4_0 and of Q4_K models as Q5_0. gsq has no
5-bit grid, so here Q4_K falls back to Q4_0 too (the same 4.5 bits per weight); a fallback tensor
uses its type's default grid (Q4_0: 4-bit g32).

The table is derived from the GGUF type table (`gsq.gguf.TYPES`: the types with a target grid),
restated in quantization terms.
"""

from __future__ import annotations

from dataclasses import dataclass

from gsq.gguf import TYPES
from gsq.quant.types import QuantSpec, check_target_spec, parse_target

__all__ = ["TARGETS", "TargetType", "check_target_spec", "fallback_target", "parse_target",
           "target_spec", "target_type"]


@dataclass(frozen=True)
class TargetType:
    """What one GGUF type stores exactly, as constraints on (codes, scales)."""

    name: str
    default_bits: int | str  # the grid `--target` implies
    max_bits: int | str  # the widest of our grids the type holds exactly
    group_size: int  # columns per scale: the fp16 block, or the K sub-block
    row_unit: int  # the type's block: a row must be whole blocks
    family: str  # "fp16": any fp16 scale; "signed_k" / "affine_k": lattice d*k per row_unit
    bpw: float  # bits per weight, scales included
    k_range: tuple[int, int] = (0, 0)  # K types: the integer sub-block scale k
    code_max: int = 0  # affine K types: stored levels 0..code_max
    offsets: tuple[int, ...] = ()  # affine K types: offsets Z with dmin = Z*d, by preference

    @property
    def is_k(self) -> bool:
        return self.family != "fp16"


TARGETS: dict[str, TargetType] = {t.name: TargetType(
    t.name, t.target_bits, t.max_bits, group_size=t.sub_block, row_unit=t.block_size,
    family=t.family, bpw=t.bpw, k_range=t.k_range,
    code_max=t.code_range[1] if t.family == "affine_k" else 0, offsets=t.offsets)
    for t in TYPES.values() if t.target_bits is not None}
# llama.cpp's choice for rows that are not whole K/TQ blocks (Q4_K -> Q5_0 there; see module doc)
FALLBACK_RULE = {name: TYPES[name].fallback for name in TARGETS if TYPES[name].fallback}


def target_type(value: str) -> TargetType:
    return TARGETS[parse_target(value)]


def target_spec(target: str, bits: int | str | None = None,
                group_size: int | None = None) -> QuantSpec:
    """The spec `--target` implies, with the given bits / group size (checked) instead."""
    tt = target_type(target)
    return QuantSpec(tt.default_bits if bits is None else bits,
                     tt.group_size if group_size is None else group_size, tt.name)


def fallback_target(target: str, in_features: int, fallback: str | None = None,
                    module: str = "tensor") -> str:
    """The type of a tensor with `in_features` columns: `target` if its rows are whole blocks,
    else `fallback` (or the rule in the module doc). ValueError if that does not fit either."""
    tt = target_type(target)
    if in_features % tt.row_unit == 0:
        return tt.name
    choice = parse_target(fallback) if fallback else FALLBACK_RULE.get(tt.name)
    if choice is None or in_features % TARGETS[choice].row_unit:
        tried = f" nor its fallback {choice}" if choice else ""
        raise ValueError(f"{module}: input width {in_features} fits neither GGUF {tt.name} (blocks "
                       f"of {tt.row_unit}){tried}; pick another with --fallback gguf:TYPE")
    return choice
