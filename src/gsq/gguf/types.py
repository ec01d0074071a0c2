"""The GGUF tensor types gsq knows: one table, one entry per type with every fact about it.

Each `GGUFType` registers its block geometry and type id (from the `gguf` package, or gsq's own
for types the package lacks: Q2_0), its byte layout (`pack` / `unpack` of `gsq.gguf.layouts`), the
family of scales it stores (which decides which gsq grids it can hold, formats.md B.5), the
activation format llama.cpp's CPU backend pairs with it, the `general.file_type` it names and, for
types a run can target (`gsq quantize --target gguf:TYPE`), the grid it implies and llama.cpp's
fallback for rows that are not whole blocks. Other modules derive their views from this table
(`quant.target.TARGETS`, the fitters of `export.gguf_blocks`, refine's refinable types,
`eval.llamacpp_numerics`'s activation roundings).

Families: "float" (plain values), "fp16" (one fp16 `d` per block: w = d*q, Q4_1/Q5_1 with the
offset m = -zero_point*d), "signed_k" (K types with w = d*k*q, signed integer sub-block scales k)
and "affine_k" (K types with w = d*k*q - dmin*m).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gsq.errors import GSQError
from gsq.gguf import layouts as L

TERNARY = "ternary"  # gsq's ternary grid {-1, 0, 1}, as `gsq.quant.types` names it
QK_K = 256  # elements per K-quant / TQ super-block
UNKNOWN_FILE_TYPE = 1024  # general.file_type "guessed" (llama.cpp's LLAMA_FTYPE_GUESSED)

# llama.cpp types the gguf package (0.19) lacks: name -> (type id, elements/block, bytes/block,
# LLAMA_FTYPE of a file mostly of that type)
_EXTRA = {"Q2_0": (42, 64, 18, 41)}


@dataclass(frozen=True)
class GGUFType:
    """Everything gsq knows about one GGUF tensor type."""

    name: str
    type_id: int  # ggml type id of the tensor info
    block_size: int  # elements per block (1 for float types)
    type_size: int  # bytes per block
    family: str  # "float", "fp16", "signed_k", "affine_k" (module doc)
    sub_block: int = 1  # elements sharing one scale: the block, or a K sub-block
    code_range: tuple[int, int] = (0, 0)  # levels the decoder multiplies (Assignment.codes)
    fit_range: tuple[int, int] = (0, 0)  # fp16 types: oriented codes c' with w = d*c'
    signs: tuple[int, ...] = (1, -1)  # fp16 types: d = sign*s, tried in this order
    zero_point: int = 0  # Q4_1 / Q5_1: q = c' + 8 / 16 and m = -8d / -16d
    k_range: tuple[int, int] = (0, 0)  # K types: sub-block integer scale range
    offsets: tuple[int, ...] = ()  # affine K types: uniform offsets Z (dmin = Z*d), by preference
    max_bits: int | str = 4  # widest gsq grid the type holds exactly
    activation: str | None = None  # llama.cpp CPU activations that meet this weight type
    file_type: int | None = None  # general.file_type of a file mostly of this type
    target_bits: int | str | None = None  # `--target gguf:TYPE`: the grid it implies
    fallback: str | None = None  # target rows that are not whole blocks: llama.cpp's choice
    pack: Callable[[L.BlockFields], np.ndarray] | None = None  # fields of N blocks -> (N, bytes)
    unpack: Callable[[np.ndarray], L.BlockFields] | None = None

    @property
    def bpw(self) -> float:
        """Bits per weight, scales included."""
        return 8.0 * self.type_size / self.block_size

    @property
    def refinable(self) -> bool:
        """Integer codes gsq can train in place (`gsq refine`): every block type."""
        return self.family != "float"

    @property
    def is_k(self) -> bool:
        """A lattice type: one fp16 step per 256 columns, an integer scale per sub-block."""
        return self.family in ("signed_k", "affine_k")


def _geometry(name: str) -> tuple[int, int, int]:
    """(type id, elements/block, bytes/block) from the gguf package, or `_EXTRA`."""
    import gguf

    if name in _EXTRA:
        return _EXTRA[name][:3]
    qtype = gguf.GGMLQuantizationType[name]
    return (int(qtype), *gguf.GGML_QUANT_SIZES[qtype])


def _file_type(member: str | None, name: str) -> int | None:
    import gguf

    if name in _EXTRA:
        return _EXTRA[name][3]
    return None if member is None else int(gguf.LlamaFileType[member])


def _t(name: str, family: str, ftype: str | None, activation: str | None, **facts) -> GGUFType:
    codec = {"pack": getattr(L, f"pack_{name.lower()}", None),
             "unpack": getattr(L, f"unpack_{name.lower()}", None)}
    return GGUFType(name, *_geometry(name), family, activation=activation,
                    file_type=_file_type(ftype, name), **codec, **facts)


# Activations: Q8_0/Q8_1 blocks of 32 for the legacy types, Q8_K blocks of 256 for K / TQ types.
# file types: None where no LLAMA_FTYPE is named after the type alone (the file says "guessed").
TYPES: dict[str, GGUFType] = {t.name: t for t in (
    _t("F32", "float", "ALL_F32", None),
    _t("F16", "float", "MOSTLY_F16", "f16"),
    _t("BF16", "float", "MOSTLY_BF16", "bf16"),
    _t("Q4_0", "fp16", "MOSTLY_Q4_0", "q8_0", sub_block=32, code_range=(-8, 7),
       fit_range=(-8, 7), target_bits=4),
    _t("Q4_1", "fp16", "MOSTLY_Q4_1", "q8_0", sub_block=32, code_range=(0, 15),
       fit_range=(-8, 7), zero_point=8),
    _t("Q5_0", "fp16", None, "q8_0", sub_block=32, code_range=(-16, 15), fit_range=(-16, 15)),
    _t("Q5_1", "fp16", None, "q8_0", sub_block=32, code_range=(0, 31), fit_range=(-16, 15),
       zero_point=16),
    _t("Q8_0", "fp16", "MOSTLY_Q8_0", "q8_0", sub_block=32, code_range=(-128, 127),
       fit_range=(-128, 127)),
    _t("Q2_0", "fp16", None, "q8_0", sub_block=64, code_range=(-1, 2), fit_range=(-1, 2),
       signs=(-1, 1), max_bits=2, target_bits=2, fallback="Q4_0"),
    _t("TQ1_0", "fp16", "MOSTLY_TQ1_0", "q8_K", sub_block=256, code_range=(-1, 1),
       fit_range=(-1, 1), max_bits=TERNARY, target_bits=TERNARY, fallback="Q4_0"),
    _t("TQ2_0", "fp16", "MOSTLY_TQ2_0", "q8_K", sub_block=256, code_range=(-1, 2),
       fit_range=(-1, 2), signs=(-1, 1), max_bits=2, target_bits=TERNARY, fallback="Q4_0"),
    _t("Q2_K", "affine_k", "MOSTLY_Q2_K", "q8_K", sub_block=16, code_range=(0, 3),
       k_range=(0, 15), offsets=(2, 1), max_bits=2, target_bits=2, fallback="Q4_0"),
    _t("Q3_K", "signed_k", "MOSTLY_Q3_K_M", "q8_K", sub_block=16, code_range=(-4, 3),
       k_range=(-32, 31), max_bits=3, target_bits=3, fallback="Q4_0"),
    # llama.cpp stores a Q4_K model's odd-width rows as Q5_0; gsq has no 5-bit grid: Q4_0
    _t("Q4_K", "affine_k", "MOSTLY_Q4_K_M", "q8_K", sub_block=32, code_range=(0, 15),
       k_range=(0, 63), offsets=(8, 4, 2, 1), target_bits=4, fallback="Q4_0"),
    _t("Q5_K", "affine_k", None, "q8_K", sub_block=32, code_range=(0, 31), k_range=(0, 63),
       offsets=(16, 8, 4, 2, 1)),
    _t("Q6_K", "signed_k", "MOSTLY_Q6_K", "q8_K", sub_block=16, code_range=(-32, 31),
       k_range=(-128, 127)),
)}
FLOAT_TYPES = tuple(name for name, t in TYPES.items() if t.family == "float")


def gguf_type(name: str) -> GGUFType:
    """The `GGUFType` named `name` (case-insensitive); GSQError for types gsq does not encode."""
    t = TYPES.get(str(name).upper())
    if t is None:
        raise GSQError(f"unknown GGUF type {name!r}; supported: {', '.join(TYPES)}")
    return t


def type_id(name: str) -> int:
    """ggml type id of any type name ('Q4_0' -> 2, 'Q2_0' -> 42, 'IQ4_XS' -> 23)."""
    import gguf

    if name in TYPES:
        return TYPES[name].type_id
    try:
        return int(gguf.GGMLQuantizationType[name])
    except KeyError:
        raise GSQError(f"unknown GGUF tensor type '{name}'") from None


def type_name(tid: int) -> str:
    """Name of any ggml type id (42 -> 'Q2_0')."""
    import gguf

    for t in TYPES.values():
        if t.type_id == tid:
            return t.name
    try:
        return gguf.GGMLQuantizationType(tid).name
    except ValueError:
        raise GSQError(f"unknown GGUF tensor type id {tid}") from None


def row_bytes(tid: int, n: int) -> int:
    """Bytes of one row of `n` elements of type `tid`; GSQError unless n is a whole number of
    blocks."""
    import gguf

    name = type_name(tid)
    if name in TYPES:
        block, size = TYPES[name].block_size, TYPES[name].type_size
    else:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tid)]
    if n % block:
        raise GSQError(f"a row of {n} elements is not a whole number of {name} blocks ({block})")
    return n // block * size


def file_type(name: str) -> int:
    """general.file_type of a file holding most of its quantized bytes in type `name`."""
    t = TYPES.get(name)
    return UNKNOWN_FILE_TYPE if t is None or t.file_type is None else t.file_type


def package_lacks(name: str) -> bool:
    """True for types the installed `gguf` package (and so transformers' GGUF reader) lacks."""
    import gguf

    return name not in gguf.GGMLQuantizationType.__members__
