"""`gsq refine`: GSQ on the codes of an existing llama.cpp GGUF file, written back in the same types
(method §13.1, GGUF K-Quant refinement).

Pipeline (`refine_gguf`):
  1. read the file and each tensor's byte offset; architectures of `gsq.gguf.ARCHITECTURES`;
  2. load the full-precision base model (HF id or folder, .gguf, 'smollm2-demo'), map every GGUF
     tensor to its HF parameter (`gsq.gguf.tensor_slot`; an MoE expert's projection to its slice
     of a merged `ffn_*_exps` tensor, refined and patched as a tensor of its own) and check names,
     shapes and head counts;
  3. make the in-memory model the file's model, except the linears of the blocks to refine, which
     stay full precision until their block is done (their block gives the FP targets): embeddings,
     norms, the output matrix and later blocks hold the file's decoded values, so each block's
     inputs come from the already-refined prefix exactly as llama.cpp would compute them;
  4. run the one block loop (`calib.sequential.run_quantization`) with two plug-ins
     (`gsq.refine.plan.make_provider`, `gsq.refine.accept.BlockAcceptance`): an init provider: a
     block linear whose type has integer codes (`REFINABLE_TYPES`: Q2_K ... Q6_K, Q4_0/Q4_1,
     Q5_0/Q5_1/Q5_K, Q8_0, TQ*) starts from the file's codes and per-sub-block (scale, min)
     (`AffineWeight`: full relaxation for types of <= 4 codes, ±2 shifts otherwise; scales frozen,
     or trained for Q2_K and snapped onto its 4-bit lattice). attn_q/attn_k rows are taken back from
     llama.cpp's interleaved rotary order to HF's. Any other linear is written into its block as
     decoded and stays fixed (passed through). The trainer keeps the best of {file, epochs} by
     held-out hard loss, so a stage never ends worse than the file on held-out data (for Q/K: on
     its quadratic proxy). Whole-block acceptance, a block hook: after a block is refined, its
     output on held-out inputs (the test windows, else val) is compared with the full-precision
     block's on the same inputs; unless it is closer than the file's assignment, the block goes
     back to the file's codes and scales (`reverted_blocks` in the report) before its outputs
     feed the next block;
  5. encode each refined tensor in its own type (`encode_assignment`), check that it decodes to the
     weight gsq trained and evaluated, and patch its bytes into a copy of the file: same offsets,
     same size, every other byte (metadata, other tensors, padding) identical. The file is written
     atomically, with a JSON report beside it (`<out>.refine.json`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from gsq.calib.sequential import run_quantization
from gsq.calib.windows import calibration_tokens, calibration_windows
from gsq.config import resolve_device
from gsq.errors import GSQError
from gsq.gguf import check_file_hparams, model_hparams, read_gguf
from gsq.io.quantized_dir import check_output_path
from gsq.models.gguf_decoded import model_slots
from gsq.models.loading import load_any_model, peek_architecture, resolve_model_source
from gsq.models.registry import REFINE, adapter_for, check_architecture
from gsq.refine.accept import BlockAcceptance, HeldOut, file_swap
from gsq.refine.patch import encode_all, write_patched, write_report
from gsq.refine.plan import file_architecture, load_file_values, make_plan, make_provider

log = logging.getLogger(__name__)

SCALE_MODES = ("frozen", "train")
PAPER_SCALE_LR = 2e-5  # Qwen GGUF Q2_K (paper Table 9)
REPORT_SUFFIX = ".refine.json"


@dataclass
class RefineResult:
    model: nn.Module  # the refined model: every weight equals the output file's decoded tensor
    tokenizer: Any
    report: dict
    out: Path

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
    t0 = time.perf_counter()
    src, out = Path(quantized), Path(out)
    check_output_path(out, overwrite)
    if out.resolve() == src.resolve():
        raise GSQError("--out must be another file than the input GGUF")
    cfg, dev = refine_config(cfg, scales), resolve_device(device)
    fields, tensors = read_gguf(src)
    file_architecture(fields, src)
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
    plan = make_plan(tensors, model_slots(tensors, model, hp, src), hp, adapter, cfg,
                     list(adapter.blocks(model))[:n_blocks], scales)
    windows = calibration_windows(calibration_tokens(tokenizer, calib), cfg,
                                  test=cfg.val_samples if heldout_samples is None
                                  else heldout_samples)
    test, micro = windows.pop("test"), cfg.train.micro_batch_size
    heldout = HeldOut(model, adapter, test, n_blocks, dev, micro) if len(test) else None
    load_file_values(model, tensors, plan, hp)
    file_errors = heldout.errors(file_swap(plan, adapter)) if heldout else []
    acceptance = BlockAcceptance(plan, adapter, model, test, micro, dev)
    records, run = run_quantization(model, adapter, windows, cfg, dev, progress,
                                    make_provider(plan, adapter), block_hook=acceptance)
    run["reverted_blocks"] = acceptance.reverted
    model.to("cpu")
    patches, refined = encode_all(plan, records)
    rows = [{"block": i, "file_rel_mse": e, "refined_rel_mse": r}
            for i, (e, r) in enumerate(zip(file_errors, heldout.errors() if heldout else [],
                                           strict=True))]
    targets = plan.targets.values()  # an expert's tensor is its slice, at its own offset
    size = write_patched(src, out, patches, {x.key: x.tensor.offset for x in targets},
                         {x.key: x.tensor.data for x in targets}, overwrite)
    report = _report(src, base, out, size, cfg, scales, plan, refined, patches, rows, run,
                     time.perf_counter() - t0)
    write_report(report_path(out), report)
    log.info("refined %d tensors of %d/%d blocks (%d patched), passed %d through -> %s",
             len(refined), n_blocks, hp.n_layer, len(patches), len(plan.passthrough), out)
    return RefineResult(model, tokenizer, report, out)


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
