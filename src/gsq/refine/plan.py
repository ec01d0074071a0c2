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
    expert_slice,
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
    module: str  # full checkpoint module name, e.g. model.layers.0.mlp.experts.3.down_proj
    tensor: GGUFTensor  # its own (out, in) tensor: for an expert, its slice of the merged one
    heads: int | None  # rotary heads of the q/k row permutation, None for other tensors
    refine: bool  # False: passed through (its decoded values are fixed in the block)
    train_scale: bool = False
    expert: int | None = None  # index in a merged ffn_*_exps tensor

    @property
    def key(self) -> str:
        """Its name in patches and reports: the GGUF name, with `[e]` for expert e's slice."""
        return self.gguf_name if self.expert is None else f"{self.gguf_name}[{self.expert}]"

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

    # (GGUF tensor name, expert index or None) -> checkpoint name of the base model's tensor
    slots: dict[tuple[str, int | None], str]
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


def _block_linears(adapter, cfg, blocks: list[nn.Module]) -> tuple[list[str], set[str]]:
    """Full names of the prefix blocks' linears (MoE experts each), and those the block loop
    will ask for."""
    from gsq.calib.sequential import active_stages

    every, asked = [], set()
    for i, block in enumerate(blocks):
        prefix = adapter.first_block_prefix().format(i=i)
        every += [prefix + n for s in adapter.block_stages(block) for n in s.linears]
        asked |= {prefix + n for s in active_stages(adapter, cfg, block) for n in s.linears}
    return every, asked


def make_plan(tensors: list[GGUFTensor], slots: dict[tuple[str, int | None], str],
              hp: HParams, adapter, cfg, blocks: list[nn.Module], scales: str) -> Plan:
    """Sort the file's tensors into refined targets, fixed prefix linears and pass-through
    (`slots`: `gsq.models.gguf_decoded.model_slots`; `blocks`: the blocks to refine)."""
    plan = Plan(slots)
    by_hf = {hf: slot for slot, hf in slots.items()}
    by_name = {t.name: t for t in tensors}
    every, asked = _block_linears(adapter, cfg, blocks)
    for module in every:
        gguf_name, expert = by_hf[f"{module}.weight"]
        t = by_name[gguf_name]
        if expert is not None:
            t = expert_slice(t, expert)
        reason = None
        if module not in asked:
            reason = "outside the refined stages (--scope)"
        elif t.type_name not in REFINABLE_TYPES:
            reason = f"type {t.type_name} has no integer codes gsq can refine"
        train = scales == "train" and t.type_name in TRAINABLE_SCALE_TYPES
        linear = FileLinear(gguf_name, module, t, qk_heads(gguf_name, hp), reason is None, train,
                            expert)
        plan.linears[module] = linear
        if reason is not None:
            plan.passthrough[linear.key] = {"type": t.type_name, "reason": reason}
    classified = {x.gguf_name for x in plan.linears.values()}
    mapped = {name for name, _ in slots}
    for t in tensors:
        if t.name not in classified:
            plan.passthrough[t.name] = {"type": t.type_name, "reason": _reason(t, mapped)}
    return plan


def _reason(t: GGUFTensor, mapped: set[str]) -> str:
    """Why a tensor outside the refined blocks' linears passes through."""
    if t.name not in mapped:
        return "no counterpart in the base model"
    if t.name.startswith("blk.") and len(t.shape) in (2, 3):  # 3-D: merged experts
        return "block not refined (--max-blocks)"
    return "not a block linear"


def load_file_values(model: nn.Module, tensors: list[GGUFTensor], plan: Plan,
                     hp: HParams) -> None:
    """Write the file's decoded values into every parameter (each expert's slice of a fused one)
    except the refined blocks' linears, which keep their full-precision values for the targets
    (step 3)."""
    from gsq.models.gguf_decoded import checkpoint_tensors

    params = checkpoint_tensors(model)
    keep = {f"{m}.weight" for m in plan.linears}
    by_name = {t.name: t for t in tensors}
    for (gguf_name, expert), hf_name in plan.slots.items():
        if hf_name in keep:
            continue
        param = params[hf_name]
        values = hf_values(by_name[gguf_name], qk_heads(gguf_name, hp), expert)
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
