"""Library entry points: quantize a model from a source, evaluate a model (no argument parsing here).

    from gsq import quantize, cpu_preset
    result = quantize("smollm2-demo", cpu_preset(bits=2, group_size=64), out="smollm2-gsq-2bit")
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gsq.calib.sequential import run_quantization
from gsq.config import QuantizeConfig
from gsq.errors import GSQError
from gsq.io.quantized_dir import check_output_path, is_quantized_dir, load_quantized, save_quantized
from gsq.models.registry import adapter_for
from gsq.quant.types import QuantizedWeight

log = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    model: torch.nn.Module  # the model with dequantized hard weights in its quantized linears
    tokenizer: object
    records: dict[str, QuantizedWeight]
    report: dict
    out: Path | None


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GSQError(f"device '{device}' requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise GSQError(f"device must be 'cpu' or 'cuda[:N]'; got '{device}'")
    return torch.device(device)


def load_any_model(source: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A base model (hub id, HF dir, .gguf, demo alias) or a gsq quantized directory -> (model, tok)."""
    from gsq.models.loading import load_base_model, resolve_model_source

    if is_quantized_dir(source):
        model, tokenizer, _ = load_quantized(source, dtype, device)
        return model, tokenizer
    return load_base_model(resolve_model_source(source), dtype=dtype, device=device)


def calibration_windows(tokenizer, calib: str | None, cfg: QuantizeConfig) -> dict[str, torch.Tensor]:
    """Tokenize the calibration text once and cut seeded, disjoint train/val/gptq windows."""
    from gsq.data.calibration import cut_windows, load_calibration_text, tokenize_text

    tokens = tokenize_text(tokenizer, load_calibration_text(calib))
    counts = {"train": cfg.nsamples, "val": cfg.val_samples, "gptq": cfg.gptq_samples}
    return cut_windows(tokens, counts, cfg.seqlen, cfg.seed)


def bits_per_parameter(records: dict[str, QuantizedWeight]) -> float:
    """(code bits + 16 per group) / weights, over the quantized tensors only (method §13)."""
    bits = sum(qw.spec.code_bits * qw.codes.numel() + 16 * qw.scale.numel() for qw in records.values())
    numel = sum(qw.codes.numel() for qw in records.values())
    return bits / numel if numel else float("nan")


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak host RSS (GiB) of this process, and peak CUDA allocation when on a GPU."""
    out = {"peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def quantize(model_source: str, cfg: QuantizeConfig, calib: str | None = None,
             out: str | Path | None = None, device: str | None = "cpu", progress: bool = True,
             overwrite: bool = False) -> QuantizeResult:
    """Load, calibrate and quantize a model; write the quantized directory to `out` if given."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    if out is not None:
        check_output_path(out, overwrite)
    model, tokenizer = load_any_model(model_source)
    adapter = adapter_for(model.config.model_type)
    windows = calibration_windows(tokenizer, calib, cfg)
    torch.manual_seed(cfg.seed)  # no code path should draw from it; a guard for third-party code
    records, report = run_quantization(model, adapter, windows, cfg, dev, progress)
    model.to("cpu")
    report.update({
        "model": model_source,
        "method": cfg.method,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "quantized_tensors": len(records),
        "quantized_weights": sum(qw.codes.numel() for qw in records.values()),
        "bpp": bits_per_parameter(records),
        "wall_seconds": time.perf_counter() - t0,
        "device": str(dev),
        **peak_memory(dev),
    })
    if out is not None:
        save_quantized(out, model, tokenizer, records, cfg.to_dict(), report, overwrite)
    return QuantizeResult(model, tokenizer, records, report, Path(out) if out else None)
