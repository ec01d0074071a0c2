"""`gsq refine`: GSQ on the codes of an existing llama.cpp GGUF file, written back in the same types
(method §13.1, GGUF K-Quant refinement).

Pipeline (`refine_gguf`):
  1. read the file and each tensor's byte offset; only the `llama` architecture;
  2. load the full-precision base model (HF id or folder, .gguf, 'smollm2-demo'), map every GGUF
     tensor to its HF parameter (`gsq.gguf.tensor_name`) and check names, shapes and head counts;
  3. make the in-memory model the file's model, except the linears of the blocks to refine, which
     stay full precision until their block is done (their block gives the FP targets): embeddings,
     norms, the output matrix and later blocks hold the file's decoded values, so each block's
     inputs come from the already-refined prefix exactly as llama.cpp would compute them;
  4. run the block loop (`refine_blocks`, `quantize_block` per block) with an init provider: a
     block linear whose type has integer codes (`REFINABLE_TYPES`: Q2_K ... Q6_K, Q4_0/Q4_1,
     Q5_0/Q5_1/Q5_K, Q8_0, TQ*) starts from the file's codes and per-sub-block (scale, min)
     (`AffineWeight`: full relaxation for types of <= 4 codes, ±2 shifts otherwise; scales frozen,
     or trained for Q2_K and snapped onto its 4-bit lattice). attn_q/attn_k rows are taken back from
     llama.cpp's interleaved rotary order to HF's. Any other linear is written into its block as
     decoded and stays fixed (passed through). The trainer keeps the best of {file, epochs} by
     held-out hard loss, so a stage never ends worse than the file on held-out data (for Q/K: on
     its quadratic proxy). Whole-block acceptance: after a block is refined, its output on held-out
     inputs (the test windows, else val) is compared with the full-precision block's on the same
     inputs; unless it is closer than the file's assignment, the block goes back to the file's
     codes and scales (`reverted_blocks` in the report) before its outputs feed the next block;
  5. encode each refined tensor in its own type (`encode_assignment`), check that it decodes to the
     weight gsq trained and evaluated, and patch its bytes into a copy of the file: same offsets,
     same size, every other byte (metadata, other tensors, padding) identical. The file is written
     atomically, with a JSON report beside it (`<out>.refine.json`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
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
    check_file_hparams,
    decode_assignment,
    decode_weight,
    encode_assignment,
    field_value,
    hf_values,
    match_tensors,
    model_hparams,
    qk_heads,
    read_gguf,
    rotary_rows,
    tensor_offsets,
)
from gsq.io.quantized_dir import atomic_output_file
from gsq.quant.affine import FULL_RELAXATION_MAX_CODES, AffineWeight

log = logging.getLogger(__name__)

# Block types with integer codes gsq can refine; every other tensor passes through untouched.
REFINABLE_TYPES = tuple(name for name, t in TYPES.items() if t.refinable)
TRAINABLE_SCALE_TYPES = ("Q2_K",)  # --scales train: the paper trains Q2_K's sub-block scales only
SCALE_MODES = ("frozen", "train")
PAPER_SCALE_LR = 2e-5  # Qwen GGUF Q2_K (paper Table 9)
REPORT_SUFFIX = ".refine.json"
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


@dataclass
class RefineResult:
    model: nn.Module  # the refined model: every weight equals the output file's decoded tensor
    tokenizer: Any
    report: dict
    out: Path


@dataclass
class _Linear:
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
class _Plan:
    """What happens to every tensor of the file."""

    by_gguf: dict[str, str]  # GGUF tensor name -> HF parameter name (tensors with a counterpart)
    linears: dict[str, _Linear] = field(default_factory=dict)  # the refined blocks', by module
    passthrough: dict[str, dict] = field(default_factory=dict)  # GGUF name -> {type, reason}

    @property
    def targets(self) -> dict[str, _Linear]:
        return {m: x for m, x in self.linears.items() if x.refine}

    def block(self, prefix: str) -> dict[str, _Linear]:
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
              cfg, n_blocks: int, scales: str) -> _Plan:
    """Sort the file's tensors into refined targets, fixed prefix linears and pass-through."""
    plan = _Plan(by_gguf)
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
        plan.linears[module] = _Linear(gguf_name, module, t, qk_heads(gguf_name, hp),
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


def load_file_values(model: nn.Module, tensors: list[GGUFTensor], plan: _Plan,
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


# --------------------------------------------------------------------------------------------
# The block loop


def make_provider(plan: _Plan):
    """The block loop's init provider: the file's records for refined linears; passed-through
    linears are written into the block as decoded (and left out, so they are not trained)."""
    def provide(bc, stage, names: list[str]) -> dict[str, AffineWeight]:
        init = {}
        for name in names:
            linear = plan.linears[bc.prefix + name]
            if linear.refine:
                init[name] = linear.record().to(bc.device)
                continue
            weight = bc.block.get_submodule(name).weight
            with torch.no_grad():
                weight.copy_(linear.values().to(weight.device, weight.dtype))
        return init
    return provide


def refine_config(cfg, scales: str):
    """The run's config: GSQ on every stage, no skips; group size 1 and no GGUF target because
    the file's types and sub-blocks define the grids (the block loop only checks that the group
    size divides the widths); the paper's Q2_K scale lr unless one was set."""
    from gsq.config import QuantizeConfig

    if scales not in SCALE_MODES:
        raise GSQError(f"--scales must be one of {', '.join(SCALE_MODES)}; got '{scales}'")
    cfg = cfg or QuantizeConfig()
    train = cfg.train
    if scales == "train" and train.scale_lr == QuantizeConfig().train.scale_lr:
        train = dataclasses.replace(train, scale_lr=PAPER_SCALE_LR)
    return cfg.replace(method="gsq", bits=2, group_size=1, target=None, fallback=None, skip=(),
                       bits_overrides=(), train=train)


def refine_windows(tokens, cfg, heldout: int) -> dict[str, Tensor]:
    """train / val / gptq windows as `calibration_windows` cuts them, plus up to `heldout` test
    windows from what is left (none if the text is too short)."""
    from gsq.data.calibration import cut_windows, window_capacity

    counts = {"train": cfg.nsamples, "val": cfg.val_samples, "gptq": cfg.gptq_samples}
    spare = window_capacity(tokens, cfg.seqlen) - sum(counts.values())
    counts["test"] = max(0, min(heldout, spare))
    return cut_windows(tokens, counts, cfg.seqlen, cfg.seed)


# --------------------------------------------------------------------------------------------
# The block loop with whole-block acceptance


def _block_map(adapter, block: nn.Module, ctx: dict, x: Tensor, micro: int, device) -> Tensor:
    """`(N, T, hidden)` outputs of `block` as it is now for inputs `x` (same device as `x`)."""
    from gsq.calib.objectives import map_batches

    with torch.no_grad():
        return map_batches(lambda h: adapter.block_forward(block, h, ctx), x, micro, device)


def revert_block(plan: _Plan, prefix: str, block: nn.Module) -> dict[str, AffineWeight]:
    """Write the file's values into the refined linears of `block` (HF module names `prefix` +
    name); returns their file records by full module name (encoded, they are the input bytes)."""
    records = {}
    for name, linear in plan.block(prefix).items():
        if not linear.refine:
            continue
        weight = block.get_submodule(name).weight
        with torch.no_grad():
            weight.copy_(linear.values().to(weight.device, weight.dtype))
        records[linear.module] = linear.record()
    return records


def _same_as_file(plan: _Plan, records: dict[str, AffineWeight]) -> bool:
    """True if every record has the file's codes and scales (nothing to revert)."""
    for module, record in records.items():
        init = plan.linears[module].record()
        if not (torch.equal(record.codes.cpu(), init.codes)
                and torch.equal(record.scale.float().cpu(), init.scale)):
            return False
    return True


def accept_block(plan: _Plan, adapter, block: nn.Module, ctx: dict, prefix: str, x: Tensor,
                 fp_out: Tensor, records: dict, micro: int, device) -> tuple[dict, dict, Tensor]:
    """Keep a refined block only if its outputs on held-out inputs `x` `(N, T, hidden)` are closer
    (relative MSE) to the FP block's `fp_out` than those of the file's assignment.

    Returns (records to keep, acceptance entry, the kept block's outputs on `x`). A block that is
    not better is reverted in place (`revert_block`); one equal to the file is kept as it is.
    """
    out = _block_map(adapter, block, ctx, x, micro, device)
    file_values = {n: lin.values() for n, lin in plan.block(prefix).items() if lin.refine}
    with _swapped(block, file_values):
        file_out = _block_map(adapter, block, ctx, x, micro, device)
    entry = {"file_rel_mse": _rel_mse(file_out, fp_out), "refined_rel_mse": _rel_mse(out, fp_out),
             "reverted": False}
    if entry["refined_rel_mse"] >= entry["file_rel_mse"] and not _same_as_file(plan, records):
        records, out, entry["reverted"] = revert_block(plan, prefix, block), file_out, True
    return records, entry, out


def refine_blocks(model: nn.Module, adapter, windows: dict[str, Tensor], test: Tensor, cfg,
                  device, progress: bool, plan: _Plan) -> tuple[dict[str, AffineWeight], dict]:
    """`run_quantization`'s block loop (train/val/gptq windows `(N, T)`) with the file's records
    as init and whole-block acceptance (`accept_block`) on the `test` windows `(M, T)`, or on the
    val windows when M = 0. Returns the records by full module name and the run report, whose
    block entries carry an "acceptance" entry; "reverted_blocks" lists the reverted ones."""
    from tqdm.auto import tqdm

    from gsq.calib.capture import capture_block_inputs
    from gsq.calib.sequential import Buffers, prepare_run, quantize_block

    t0, micro = time.perf_counter(), cfg.train.micro_batch_size
    run = prepare_run(model, adapter, windows, cfg, device)
    blocks, n_blocks, ctx, home, bufs = run.blocks, run.n_blocks, run.ctx, run.home, run.bufs
    held = capture_block_inputs(model, adapter, test, device, micro).to(home) if len(test) else None
    provider, records, reports, reverted = make_provider(plan), {}, [], []
    prefix, inputs = adapter.first_block_prefix(), "val" if held is None else "test"
    for index in tqdm(range(n_blocks), desc="blocks", unit="block", disable=not progress):
        block = blocks[index]
        block_home = next(block.parameters()).device
        block.to(device)
        x = bufs.val if held is None else held
        fp_out = _block_map(adapter, block, ctx, x, micro, device)  # refined linears still FP
        block_records, report, next_bufs = quantize_block(block, index, adapter, cfg, bufs, ctx,
                                                          progress, provider)
        block_records, entry, out = accept_block(plan, adapter, block, ctx, prefix.format(i=index),
                                                 x, fp_out, block_records, micro, device)
        if entry["reverted"]:
            next_bufs = Buffers(*(_block_map(adapter, block, ctx, b, micro, device)
                                  for _, b in bufs.items()))
            reverted.append(index)
            log.info("block %d: reverted to the file's codes (held-out rel. MSE %.4g, file %.4g)",
                     index, entry["refined_rel_mse"], entry["file_rel_mse"])
        bufs, held = next_bufs, (out if held is not None else None)
        block.to(block_home)
        records.update(block_records)
        reports.append({**report, "acceptance": {"inputs": inputs, **entry}})
    return records, {"blocks": reports, "quantize_seconds": time.perf_counter() - t0,
                     "blocks_quantized": n_blocks, "blocks_total": len(blocks),
                     "reverted_blocks": reverted}


# --------------------------------------------------------------------------------------------
# Encoding and writing


def encode_target(target: _Linear, record: AffineWeight) -> tuple[np.ndarray, int, int]:
    """Bytes of the refined tensor in its own type (file row order), and how many codes and
    sub-block scales changed.

    GSQError if the bytes do not decode to exactly `record.dequantize()` (HF rows) or their size
    differs from the original."""
    a = target.assignment()
    codes = record.codes.cpu().numpy().astype(np.int16)
    new = dataclasses.replace(a, codes=codes)
    if record.train_scale:
        new = _with_q2k_scales(new, record.scale.cpu().numpy())
    scales_changed = int((new.sub_scale != a.sub_scale).sum())
    data = encode_assignment(permute_assignment(new, target.heads, False))
    t = target.tensor
    if data.shape != t.data.shape:
        raise GSQError(f"internal error: re-encoded '{t.name}' has shape {data.shape}, the file "
                       f"{t.data.shape}")
    decoded = decode_weight(t.type_name, data, t.shape[1])
    want = record.dequantize().cpu().numpy()
    if target.heads:
        decoded = rotary_rows(decoded, target.heads, True)
    if not np.array_equal(decoded, want):
        raise GSQError(f"internal error: re-encoded '{t.name}' does not decode to gsq's weight")
    return data, int((codes != a.codes).sum()), scales_changed


def encode_all(plan: _Plan, records: dict[str, AffineWeight]) -> tuple[dict, dict]:
    """Bytes of every refined tensor whose codes or scales changed (by GGUF name), and the
    report entry of every refined tensor."""
    patches, entries = {}, {}
    for module, target in plan.targets.items():
        data, changed, scales_changed = encode_target(target, records[module])
        if changed or scales_changed:
            patches[target.gguf_name] = data
        entries[target.gguf_name] = _tensor_entry(target, changed, scales_changed)
    return patches, entries


def _with_q2k_scales(a: Assignment, scale: np.ndarray) -> Assignment:
    """Q2_K fields d, sub_scale for snapped sub-block scales `(out, in/16)`."""
    from gsq.export.gguf_lattice import fit_lattice

    t = scale.astype(np.float32).reshape(scale.shape[0], -1, 16)
    fit = fit_lattice(t, 0, 15)
    if not fit.ok.all():
        raise GSQError("internal error: trained Q2_K scales are not on the 4-bit lattice")
    return dataclasses.replace(a, d=fit.step.astype(np.float32),
                               sub_scale=fit.k.astype(np.int16).reshape(a.sub_scale.shape))


def write_patched(src: Path, out: Path, patches: dict[str, np.ndarray], offsets: dict[str, int],
                  originals: dict[str, np.ndarray], overwrite: bool) -> int:
    """Copy `src` to `out` (atomically) with the bytes of the patched tensors replaced in place.

    Each patch is checked against the bytes at its offset first (the offsets are right) and must
    have the original's size, so the file keeps its size and layout. Returns the file size."""
    raw = np.memmap(src, dtype=np.uint8, mode="r")
    for name, data in patches.items():
        start, old = offsets[name], originals[name]
        if data.nbytes != old.nbytes or not np.array_equal(raw[start:start + old.nbytes],
                                                           old.reshape(-1)):
            raise GSQError(f"internal error: tensor '{name}' is not where the file says")
    del raw
    with atomic_output_file(out, overwrite) as tmp:
        shutil.copyfile(src, tmp)
        with open(tmp, "r+b") as f:
            for name, data in sorted(patches.items(), key=lambda kv: offsets[kv[0]]):
                f.seek(offsets[name])
                f.write(np.ascontiguousarray(data).tobytes())
        size = tmp.stat().st_size
        if size != src.stat().st_size:
            raise GSQError(f"internal error: the refined file has {size} bytes, the input "
                           f"{src.stat().st_size}")
    return size


def write_report(path: Path, report: dict) -> None:
    """JSON beside the output, written under a temporary name and renamed."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.resolve().parent)
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(name, path)


# --------------------------------------------------------------------------------------------
# Held-out block errors: the file vs the refined model, against the full-precision model


@contextmanager
def _swapped(module: nn.Module, values: dict[str, Tensor]) -> Iterator[None]:
    """Weights of `module`'s linears temporarily replaced by `values` (by linear name)."""
    saved = {name: module.get_submodule(name).weight.data for name in values}
    try:
        for name, value in values.items():
            weight = module.get_submodule(name).weight
            weight.data = value.to(weight.device, weight.dtype)
        yield
    finally:
        for name, value in saved.items():
            module.get_submodule(name).weight.data = value


@torch.no_grad()
def block_outputs(model: nn.Module, adapter, ids: Tensor, n_blocks: int, device: torch.device,
                  micro: int, swap=None) -> Iterator[Tensor]:
    """Hidden states after each of the first `n_blocks` blocks for windows `ids` `(N, T)`, each
    `(N, T, hidden)` on the host, one block at a time (modules visit `device` and come back).
    swap(i) -> {linear name: weight} replaces block i's linears while it runs."""
    from gsq.calib.capture import capture_block_context, capture_block_inputs
    from gsq.calib.objectives import map_batches

    embeds = adapter.embedding_modules(model)
    for module in embeds:
        module.to(device)
    try:
        ctx = capture_block_context(model, adapter, ids.shape[1], device)
        h = capture_block_inputs(model, adapter, ids, device, micro).cpu()
    finally:
        for module in embeds:
            module.to("cpu")
    for i, block in enumerate(list(adapter.blocks(model))[:n_blocks]):
        with _swapped(block, swap(i) if swap else {}):
            block.to(device)
            h = map_batches(lambda x, b=block: adapter.block_forward(b, x, ctx), h, micro, device)
            block.to("cpu")
        yield h


def _rel_mse(x: Tensor, ref: Tensor) -> float:
    return float(((x - ref).double() ** 2).mean()) / (float((ref.double() ** 2).mean()) or 1.0)


class HeldOut:
    """Block outputs on held-out windows: the FP model's are kept (one `(N, T, hidden)` tensor a
    block), the input file's and the refined model's are compared with them as they come."""

    def __init__(self, model, adapter, ids: Tensor, n_blocks: int, device, micro: int) -> None:
        self.args = (model, adapter, ids, n_blocks, device, micro)
        self.full = list(block_outputs(*self.args))  # run before the file values are loaded

    def errors(self, swap=None) -> list[float]:
        """Relative MSE against the FP outputs, per block, of the model as it is now (with
        `swap`, see `block_outputs`)."""
        return [_rel_mse(h, f) for h, f in zip(block_outputs(*self.args, swap=swap), self.full,
                                               strict=True)]


def file_swap(plan: _Plan, adapter):
    """swap(i) for `block_outputs`: block i's linears as the input file has them."""
    def swap(i: int) -> dict[str, Tensor]:
        prefix = adapter.first_block_prefix().format(i=i)
        return {name: x.values() for name, x in plan.block(prefix).items()}
    return swap


# --------------------------------------------------------------------------------------------
# Entry point


def report_path(out: str | Path) -> Path:
    """Where the JSON report of a refined file goes: `<out>.refine.json`."""
    return Path(str(out) + REPORT_SUFFIX)


def refine_gguf(quantized: str | Path, base: str, out: str | Path, *, cfg=None,
                calib: str | None = None, scales: str = "frozen", device: str | None = "cpu",
                progress: bool = True, overwrite: bool = False,
                heldout_samples: int | None = None) -> RefineResult:
    """Refine the codes of the llama.cpp GGUF file `quantized` with GSQ against the
    full-precision `base` model and write them, in the same tensor types, to `out`.

    cfg: budget and schedule (`QuantizeConfig`, e.g. `cpu_preset()`; bits and group size are
    ignored), calib: calibration text (`gsq quantize --calib`), scales: "frozen" (default) or
    "train" (Q2_K sub-block scales trained and re-encoded on their 4-bit lattice).
    heldout_samples: windows beyond train/val/gptq on which the block outputs of the file and of
    the refined model are compared with the FP model (default: cfg.val_samples; 0 = skip).
    Returns the refined model (equal to the output file weight for weight) and the report, also
    written to `<out>.refine.json`.
    """
    from gsq.api import calibration_tokens, load_any_model, resolve_device
    from gsq.io.quantized_dir import check_output_path
    from gsq.models.loading import peek_architecture, resolve_model_source
    from gsq.models.registry import REFINE, adapter_for, check_architecture

    t0 = time.perf_counter()
    src, out = Path(quantized), Path(out)
    check_output_path(out, overwrite)
    if out.resolve() == src.resolve():
        raise GSQError("--out must be another file than the input GGUF")
    cfg, dev = refine_config(cfg, scales), resolve_device(device)
    fields, tensors = read_gguf(src)
    file_architecture(fields, src)
    offsets = tensor_offsets(src)
    base_type, base_config = peek_architecture(resolve_model_source(base))
    try:  # before the base model's weights are loaded
        check_architecture(base_type, base_config, needs=(REFINE,))
    except GSQError as err:
        raise GSQError(f"base model '{base}': {err}") from None
    model, tokenizer = load_any_model(base)
    try:
        hp = model_hparams(model.config)
    except GSQError as err:
        raise GSQError(f"base model '{base}': {err}") from None
    adapter = adapter_for(model.config.model_type)
    check_file_hparams(fields, hp, src)
    n_blocks = min(hp.n_layer, cfg.max_blocks or hp.n_layer)
    plan = make_plan(tensors, match_tensors(tensors, model, hp, src), hp, adapter, cfg, n_blocks,
                     scales)
    windows = refine_windows(calibration_tokens(tokenizer, calib), cfg,
                             cfg.val_samples if heldout_samples is None else heldout_samples)
    test, micro = windows.pop("test"), cfg.train.micro_batch_size
    heldout = HeldOut(model, adapter, test, n_blocks, dev, micro) if len(test) else None
    load_file_values(model, tensors, plan, hp)
    file_errors = heldout.errors(file_swap(plan, adapter)) if heldout else []
    records, run = refine_blocks(model, adapter, windows, test, cfg, dev, progress, plan)
    model.to("cpu")
    patches, refined = encode_all(plan, records)
    rows = [{"block": i, "file_rel_mse": e, "refined_rel_mse": r}
            for i, (e, r) in enumerate(zip(file_errors, heldout.errors() if heldout else [],
                                           strict=True))]
    size = write_patched(src, out, patches, offsets,
                         {x.gguf_name: x.tensor.data for x in plan.targets.values()}, overwrite)
    report = _report(src, base, out, size, cfg, scales, plan, refined, patches, rows, run,
                     time.perf_counter() - t0)
    write_report(report_path(out), report)
    log.info("refined %d tensors of %d/%d blocks (%d patched), passed %d through -> %s",
             len(refined), n_blocks, hp.n_layer, len(patches), len(plan.passthrough), out)
    return RefineResult(model, tokenizer, report, out)


def _tensor_entry(target: _Linear, changed: int, scales_changed: int) -> dict:
    lo, hi = TYPES[target.tensor.type_name].code_range
    numel = int(np.prod(target.tensor.shape))
    return {"module": target.module, "type": target.tensor.type_name,
            "relaxation": "full" if hi - lo + 1 <= FULL_RELAXATION_MAX_CODES else "shift",
            "scales": "trained" if target.train_scale else "frozen", "codes": numel,
            "changed_codes": changed, "changed_fraction": changed / max(numel, 1),
            "changed_sub_scales": scales_changed}


def _report(src, base, out, size, cfg, scales, plan, refined, patches, heldout, run,
            seconds) -> dict:
    changed = sum(r["changed_codes"] for r in refined.values())
    codes = sum(r["codes"] for r in refined.values())
    return {
        "input": str(src), "base": str(base), "out": str(out), "file_bytes": size,
        "scales": scales, "blocks_refined": run["blocks_quantized"],
        "blocks_total": run["blocks_total"], "reverted_blocks": run["reverted_blocks"],
        "refined_types": dict(sorted(Counter(r["type"] for r in refined.values()).items())),
        "passthrough_types": dict(sorted(Counter(p["type"] for p in
                                                 plan.passthrough.values()).items())),
        "changed_codes": changed, "changed_fraction": changed / codes if codes else 0.0,
        "tensors_patched": sorted(patches), "refined": refined, "passthrough": plan.passthrough,
        "heldout": heldout, "config": cfg.to_dict(), "run": run, "seconds": seconds,
    }
