"""What `gsq refine` does with every tensor of a GGUF file: the refined linears (their file
assignment as the initial records), the fixed ones, and those passed through untouched."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gsq.errors import GSQError
from gsq.gguf import (
    ARCHITECTURES,
    TYPES,
    Assignment,
    GGUFTensor,
    HParams,
    decode_assignment,
    field_value,
    hf_values,
    qk_heads,
    rotary_rows,
)
from gsq.quant.affine import AffineWeight

# Block types with integer codes gsq can refine; every other tensor passes through untouched.
REFINABLE_TYPES = tuple(name for name, t in TYPES.items() if t.refinable)
TRAINABLE_SCALE_TYPES = ("Q2_K",)  # --scales train: the paper trains Q2_K's sub-block scales only
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


@dataclass
class FileLinear:
    """One linear of a refined block, read from the file on demand (one block in memory)."""

    gguf_name: str
    module: str  # full HF module name, e.g. model.layers.0.mlp.down_proj
    tensor: GGUFTensor
    heads: int | None  # rotary heads of the q/k row permutation, None for other tensors
    refine: bool  # False: passed through (its decoded values are fixed in the block)
    train_scale: bool = False

    def assignment(self) -> Assignment:
        """The file's codes and affine maps, rows in HF order."""
        t = self.tensor
        return permute_assignment(decode_assignment(t.type_name, t.data, t.shape[1]), self.heads,
                                  True)

    def record(self) -> AffineWeight:
        """The initial record of a refined linear (the file's assignment)."""
        return _record(self.assignment(), self.train_scale)

    def values(self) -> Tensor:
        """The decoded weight `(out, in)` in HF row order."""
        return hf_values(self.tensor, self.heads)


@dataclass
class Plan:
    """What happens to every tensor of the file."""

    by_gguf: dict[str, str]  # GGUF tensor name -> HF parameter name (tensors with a counterpart)
    linears: dict[str, FileLinear] = field(default_factory=dict)  # the refined blocks', by module
    passthrough: dict[str, dict] = field(default_factory=dict)  # GGUF name -> {type, reason}

    @property
    def targets(self) -> dict[str, FileLinear]:
        return {m: x for m, x in self.linears.items() if x.refine}

    def block(self, prefix: str) -> dict[str, FileLinear]:
        """The linears of one block by their name in it (e.g. 'mlp.up_proj')."""
        return {m.removeprefix(prefix): x for m, x in self.linears.items() if m.startswith(prefix)}

# --------------------------------------------------------------------------------------------
# Reading the file


def file_architecture(fields: dict[str, Any], path: str | Path) -> str:
    """`general.architecture` of the file; GSQError unless gsq refine supports it."""
    if "general.architecture" not in fields:
        raise GSQError(f"GGUF file '{path}' has no general.architecture key")
    arch = str(field_value(fields["general.architecture"]))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GSQError(f"GGUF file '{path}' has architecture '{arch}'; gsq refine supports "
                       f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def permute_assignment(a: Assignment, n_heads: int | None, to_hf: bool) -> Assignment:
    """Every per-row field of `a` with its rows reordered (see `rotary_rows`); None: unchanged."""
    if n_heads is None:
        return a
    fields = ("codes", "d", "dmin", "sub_scale", "sub_min")
    return dataclasses.replace(a, **{k: rotary_rows(getattr(a, k), n_heads, to_hf)
                                     for k in fields})


# --------------------------------------------------------------------------------------------
# The plan: refined, fixed and passed-through tensors


def _q2k_snap(scale: Tensor) -> Tensor:
    """Q2_K sub-block scales `(out, in/16)` onto the lattice d·k (fp16 d per 256 columns,
    k in 0..15); scales already on it are kept (a projection, so hard_result is idempotent)."""
    from gsq.export.gguf_lattice import snap_lattice

    s = scale.detach().float().cpu().numpy()
    t = s.reshape(s.shape[0], -1, 16)
    fit = snap_lattice(t, 0, 15)
    snapped = (fit.step[..., None] * fit.k).astype(np.float32).reshape(s.shape)
    return torch.from_numpy(snapped).to(scale.device)


def _record(a: Assignment, train_scale: bool) -> AffineWeight:
    """AffineWeight of an assignment; int8 codes where the type's range fits (every type gsq
    refines does)."""
    snap = _q2k_snap if train_scale else None
    lo, hi = a.code_range
    codes = a.codes.astype(np.int8 if lo >= -128 and hi <= 127 else np.int16)
    return AffineWeight(torch.from_numpy(codes), torch.from_numpy(a.scale),
                        torch.from_numpy(a.min), a.sub_block, tuple(a.code_range), train_scale,
                        snap)


def _block_linears(adapter, cfg, n_blocks: int) -> tuple[list[str], set[str]]:
    """Full names of the prefix blocks' linears, and those the block loop will ask for."""
    from gsq.calib.sequential import active_stages

    in_scope = {n for s in active_stages(adapter, cfg) for n in s.linears}
    prefix = adapter.first_block_prefix()
    every = [prefix.format(i=i) + n for i in range(n_blocks) for n in adapter.linear_names()]
    asked = {prefix.format(i=i) + n for i in range(n_blocks) for n in in_scope}
    return every, asked


def make_plan(tensors: list[GGUFTensor], by_gguf: dict[str, str], hp: HParams, adapter,
              cfg, n_blocks: int, scales: str) -> Plan:
    """Sort the file's tensors into refined targets, fixed prefix linears and pass-through."""
    plan = Plan(by_gguf)
    by_hf = {hf: g for g, hf in by_gguf.items()}
    by_name = {t.name: t for t in tensors}
    every, asked = _block_linears(adapter, cfg, n_blocks)
    for module in every:
        gguf_name = by_hf[f"{module}.weight"]
        t = by_name[gguf_name]
        reason = None
        if module not in asked:
            reason = "outside the refined stages (--scope)"
        elif t.type_name not in REFINABLE_TYPES:
            reason = f"type {t.type_name} has no integer codes gsq can refine"
        train = scales == "train" and t.type_name in TRAINABLE_SCALE_TYPES
        plan.linears[module] = FileLinear(gguf_name, module, t, qk_heads(gguf_name, hp),
                                       reason is None, train)
        if reason is not None:
            plan.passthrough[gguf_name] = {"type": t.type_name, "reason": reason}
    refined = {x.gguf_name for x in plan.targets.values()}
    for t in tensors:
        if t.name not in refined and t.name not in plan.passthrough:
            plan.passthrough[t.name] = {"type": t.type_name, "reason": _reason(t, by_gguf)}
    return plan


def _reason(t: GGUFTensor, by_gguf: dict[str, str]) -> str:
    """Why a tensor outside the refined blocks' linears passes through."""
    if t.name not in by_gguf:
        return "no counterpart in the base model"
    if t.name.startswith("blk.") and len(t.shape) == 2:
        return "block not refined (--max-blocks)"
    return "not a block linear"


def load_file_values(model: nn.Module, tensors: list[GGUFTensor], plan: Plan,
                     hp: HParams) -> None:
    """Write the file's decoded values into every parameter except the refined blocks' linears,
    which keep their full-precision values for the targets (step 3)."""
    params = dict(model.named_parameters())
    keep = {f"{m}.weight" for m in plan.linears}
    for t in tensors:
        hf_name = plan.by_gguf.get(t.name)
        if hf_name is None or hf_name in keep:
            continue
        param = params.get(hf_name)
        if param is None:  # a buffer, or a tied duplicate
            continue
        values = hf_values(t, qk_heads(t.name, hp))
        with torch.no_grad():
            param.copy_(values.reshape(param.shape).to(param.dtype))


def make_provider(plan: Plan, adapter):
    """The block loop's init provider: the file's records for refined linears; passed-through
    linears are written into the block as decoded (and left out, so they are not trained)."""
    def provide(bc, stage, names: list[str]) -> dict[str, AffineWeight]:
        init = {}
        for name in names:
            linear = plan.linears[bc.prefix + name]
            if linear.refine:
                init[name] = linear.record().to(bc.device)
                continue
            weight = adapter.weight(bc.block, name)
            with torch.no_grad():
                weight.copy_(linear.values().to(weight.device, weight.dtype))
        return init
    return provide
