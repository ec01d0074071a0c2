"""Library entry points (no argument parsing here): `quantize` a model from a source,
`quantize_model` in memory, `evaluate` a model, `export` a quantized directory, `refine` a
llama.cpp GGUF file.

    from gsq import quantize, evaluate, cpu_preset
    result = quantize("smollm2-demo", cpu_preset(bits=2, group_size=64), out="smollm2-gsq-2bit")
    evaluate("smollm2-gsq-2bit", "wiki.test.raw", base="smollm2-demo")
    from gsq.api import export
    export("smollm2-gsq-2bit", "smollm2-gsq-2bit.gguf", format="gguf")
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from gsq import dist
from gsq.calib.scale_finetune import capture_teacher, scale_finetune
from gsq.calib.sensitivity import allocate_widths
from gsq.calib.sequential import active_stages, run_quantization, stage_specs
from gsq.calib.windows import calibration_tokens, calibration_windows
from gsq.config import QuantizeConfig, resolve_device
from gsq.errors import GSQError
from gsq.eval import evaluate
from gsq.io.partial import partial_path
from gsq.io.quantized_dir import REPORT_FILE, check_output_path
from gsq.memory import peak_memory, rank_entries, reset_peak_memory
from gsq.models.loading import load_any_model
from gsq.models.quantized import load_quantized
from gsq.models.registry import GGUF, adapter_for, check_architecture
from gsq.models.streaming import StreamedModel, open_model
from gsq.plan import compare_plan, plan_for
from gsq.quant.types import QuantizedWeight
from gsq.refine import RefineResult, refine_gguf
from gsq.run import RunInputs, modules_report, run_streamed

__all__ = ["QuantizeResult", "RefineResult", "calibration_tokens", "calibration_windows",
           "evaluate", "export", "load_any_model", "quantize", "quantize_model", "refine",
           "resolve_device"]

log = logging.getLogger(__name__)


class QuantizeResult:
    """What `quantize` returns: the report, the output directory, the tokenizer, and the
    quantized model and its records, read from the output directory on first use (a model
    larger than memory is never loaded unless asked for)."""

    def __init__(self, model: torch.nn.Module | None, tokenizer: object,
                 records: dict[str, QuantizedWeight] | None, report: dict,
                 out: Path | None) -> None:
        self._model, self._records = model, records
        self.tokenizer, self.report, self.out = tokenizer, report, out

    def _load(self) -> None:
        if self.out is None:
            raise GSQError("the quantized model was not kept (no output directory)")
        self._model, _, self._records = load_quantized(self.out)

    @property
    def model(self) -> torch.nn.Module:
        """The model with the dequantized hard weights in its quantized linears (fp32)."""
        if self._model is None:
            self._load()
        return self._model

    @property
    def records(self) -> dict[str, QuantizedWeight]:
        if self._records is None:
            self._load()
        return self._records


def bits_per_parameter(records: dict[str, QuantizedWeight]) -> float:
    """(code bits + 16 per group) / weights, over the quantized tensors only (method §13); a
    tensor with a GGUF target counts that type's bits per weight."""
    bits = sum(qw.spec.bpp * qw.codes.numel() if qw.spec.target else
               qw.spec.code_bits * qw.codes.numel() + 16 * qw.scale.numel()
               for qw in records.values())
    numel = sum(qw.codes.numel() for qw in records.values())
    return bits / numel if numel else float("nan")


def quantize_model(model: torch.nn.Module, tokenizer, cfg: QuantizeConfig,
                   calib_tokens, device: torch.device,
                   progress: bool = True) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize an in-memory model in place; returns (records, report with totals).
    Under torchrun, data parallel over its processes (`gsq.dist`), each returning the same
    records; the activations are computed in shares but every process keeps them all (no shared
    folder here: `quantize` with an output directory shares them). `report["ranks"]`: each
    process's peak memory, windows propagated and MoE experts solved (`gsq.memory.rank_entries`)."""
    t0 = time.perf_counter()
    device = dist.rank_device(device)
    progress = progress and dist.launch_world().is_main
    reset_peak_memory(device)
    adapter = adapter_for(model.config.model_type)
    windows = calibration_windows(calib_tokens, cfg)
    with dist.launched(device):
        teacher = (capture_teacher(model, adapter, windows, cfg, device) if cfg.e2e.epochs
                   else None)
        allocation = None
        if cfg.bpw is not None:
            cfg, allocation = allocate_widths(model, adapter, windows, cfg, device,
                                              progress=progress)
        records, report = run_quantization(model, adapter, windows, cfg, device, progress)
        if allocation is not None:
            report["allocation"] = allocation
        if teacher is not None:
            records, report["e2e"] = scale_finetune(model, adapter, records, windows, teacher,
                                                    cfg, device, progress)
        # every process's peak memory and share of the propagated windows (a collective)
        ranks = rank_entries(device, windows_propagated=report.pop("windows_propagated"),
                             experts_solved=report.pop("experts_solved"))
    model.to("cpu")
    report.update({
        "method": cfg.method,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "quantized_tensors": len(records),
        "quantized_weights": sum(qw.codes.numel() for qw in records.values()),
        "bpp": bits_per_parameter(records),
        "quantize_seconds": time.perf_counter() - t0,
        "device": str(device),
        **peak_memory(device),
        **target_report(cfg, records),
        **moe_report(cfg, report),
        "ranks": ranks,
    })
    return records, report


def finetune_output(out: Path, model_source: str, windows: dict[str, torch.Tensor],
                    cfg: QuantizeConfig, device: torch.device, progress: bool = True,
                    streamed: bool = False, spill: bool = False,
                    source: StreamedModel | None = None) -> dict:
    """The end-to-end scale stage (`gsq.calib.scale_finetune`) on a finished quantized directory.

    streamed: one block at a time (`gsq.calib.scale_stream`): the teacher from the source
    (`source`: `model_source` opened by `open_model`, if not given) block by block, then the
    quantized blocks from `out`; only the changed tensors are rewritten (`rewrite_tensors`). Its
    activations go to memory-mapped files beside `out` with `spill`. Else in memory: the
    full-precision model (the teacher, run once and dropped) and then the quantized model are
    loaded whole, and `out` is saved anew. Either way `out` is replaced atomically when the stage
    keeps trained scales (a kill leaves the directory the block loop wrote); else only its report
    gains the `e2e` entry. Records read back from disk do not carry a K-type target's scale
    lattice, so such tensors keep their scales (listed under `e2e.frozen`). Returns the report.
    """
    reset_peak_memory(device)
    stage = _stage_streamed if streamed else _stage_in_memory
    e2e, write = stage(Path(out), model_source, source, windows, cfg, device, progress, spill)
    e2e.update({"streamed": streamed, **peak_memory(device)})
    if not dist.world().is_main:  # rank 0 rewrites `out` (`gsq.dist`)
        dist.barrier()
        return json.loads((Path(out) / REPORT_FILE).read_text())
    report = json.loads((Path(out) / REPORT_FILE).read_text())
    report["e2e"] = e2e
    report["wall_seconds"] = report.get("wall_seconds", 0.0) + e2e["seconds"]
    if e2e["best_epoch"] == 0:
        write_report(out, report)
    else:
        write(report)
    dist.barrier()
    return report


def _stage_in_memory(out: Path, model_source: str, source, windows, cfg, device,
                     progress: bool, spill: bool):
    """(report entry, writer of `out` given the report): the stage with both models whole."""
    from gsq.io.quantized_dir import META_FILE, save_quantized

    fp_model, _ = load_any_model(model_source)
    adapter = adapter_for(fp_model.config.model_type)
    teacher = capture_teacher(fp_model, adapter, windows, cfg, device)
    del fp_model
    model, tokenizer, records = load_quantized(out)
    records, e2e = scale_finetune(model, adapter, records, windows, teacher, cfg, device,
                                  progress)

    def write(report: dict) -> None:
        config = json.loads((out / "config.json").read_text())
        dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"))
        meta = json.loads((out / META_FILE).read_text())
        save_quantized(out, model.to("cpu", dtype), tokenizer, records, meta["config"], report,
                       overwrite=True)
    return e2e, write


def _stage_streamed(out: Path, model_source: str, source: StreamedModel | None, windows, cfg,
                    device, progress: bool, spill: bool):
    """(report entry, writer of `out` given the report): the stage one block at a time."""
    from gsq.calib.cache import ActivationStore
    from gsq.calib.scale_finetune import kept_scale
    from gsq.calib.scale_stream import host_multipliers, scale_finetune_streamed
    from gsq.io.quantized_dir import rewrite_tensors
    from gsq.models.quantized_stream import open_quantized, rewritten_files
    from gsq.models.streaming import StreamedBlocks

    source = source or open_model(model_source)
    adapter = adapter_for(source.model.config.model_type)
    loader = open_quantized(out)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.e2e-", dir=out.resolve().parent) as tmp:
        store = ActivationStore(tmp, on_disk=True) if spill else None
        teacher = capture_teacher(source.model, adapter, windows, cfg, device,
                                  StreamedBlocks(source.model, adapter, source.source), store)
        codes = loader.codes
        trainable = host_multipliers(loader.model, adapter, codes.specs,
                                     {n: codes.scale_shape(n) for n in codes.specs},
                                     cfg.e2e.norms)
        e2e = scale_finetune_streamed(loader.model, adapter, loader, trainable, windows, teacher,
                                      cfg, device, progress, store)
        del teacher, store

    def new_scales(records: dict) -> dict:
        return {n: kept_scale(qw, trainable.scales[n]) for n, qw in records.items()
                if n in trainable.scales}

    def write(report: dict) -> None:
        norms = {n: m.detach() for n, m in trainable.norms.items()}
        rewrite_tensors(out, rewritten_files(loader, new_scales, norms), report)
    return e2e, write


def write_report(out: Path, report: dict) -> None:
    """Replace `out`'s report.json atomically."""
    path = Path(out) / REPORT_FILE
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


def moe_report(cfg: QuantizeConfig, report: dict) -> dict:
    """For MoE models: the token threshold, the number of routed experts, and the experts that
    took each fallback (`sequential.Routing`; per-expert token counts are in the MLP stages)."""
    experts = [e for block in report["blocks"] for stage in block["stages"]
               for e in stage.get("experts", [])]
    if not experts:
        return {}
    return {"moe": {
        "min_tokens": cfg.moe_min_tokens,
        "experts": len(experts),
        **{fallback: [e["expert"] for e in experts if fallback in e["fallback"]]
           for fallback in ("pooled_hessian", "kept_init")},
    }}


def target_report(cfg: QuantizeConfig, records: dict[str, QuantizedWeight]) -> dict:
    """With a GGUF target: the target, the tensor count per type, and the tensors that got the
    fallback type because their rows are not whole blocks of the target (module -> type)."""
    if cfg.target is None:
        return {}
    types: dict[str, int] = {}
    for qw in records.values():
        types[qw.spec.target] = types.get(qw.spec.target, 0) + 1
    fallback = {name: qw.spec.target for name, qw in records.items()
                if qw.spec.target != cfg.target}
    return {"target": cfg.target, "target_types": types, "fallback": fallback}


def check_module_specs(model: torch.nn.Module, adapter, cfg: QuantizeConfig) -> None:
    """The spec of every linear the run will quantize (group size dividing its width, a GGUF
    target's fallback), so that such errors come before any calibration work."""
    for index, block in enumerate(adapter.blocks(model)[: cfg.max_blocks]):
        prefix = adapter.first_block_prefix().format(i=index)
        for stage in active_stages(adapter, cfg, block):
            stage_specs(cfg, stage, prefix, block, adapter)


def check_source_architecture(model_source: str, cfg: QuantizeConfig,
                              export_formats: tuple[str, ...] = ()) -> None:
    """GSQError, before any weight is loaded, if gsq cannot quantize the source's architecture
    or cannot export it in `export_formats` ("gguf", "compressed-tensors"; a GGUF target implies
    "gguf"), or, for GGUF, cannot convert an HF source's tokenizer (a .gguf source's is copied)."""
    from gsq.export.gguf_tokenizer import check_source_tokenizer
    from gsq.models.loading import peek_architecture, resolve_model_source

    source = resolve_model_source(model_source)
    model_type, config = peek_architecture(source)
    needs = (*export_formats, *((GGUF,) if cfg.target is not None else ()))
    check_architecture(model_type, config, needs)
    if GGUF in needs and not str(source).lower().endswith(".gguf"):
        check_source_tokenizer(str(source))


def quantize(model_source: str, cfg: QuantizeConfig, calib: str | None = None,
             out: str | Path | None = None, device: str | None = "cpu", progress: bool = True,
             overwrite: bool = False, resume: bool = False,
             export_formats: tuple[str, ...] = (), chat_template: bool = False,
             max_host_memory: float | None = None,
             e2e_streamed: str = "auto") -> QuantizeResult:
    """Quantize a model streamed from disk block by block and write the quantized directory to
    `out` (see `gsq.run`); without `out`, into a temporary directory whose model is loaded.

    resume: continue the partial run `OUT.partial` a killed run left (or start one).
    max_host_memory: host budget in GiB (default: 3/4 of the machine's memory); calibration
    activations go to memory-mapped files in `OUT.partial` when the planned peak exceeds it.
    export_formats: formats the result will be exported in ("gguf", "compressed-tensors"),
    checked against the architecture before any work, as a GGUF `cfg.target` is.
    calib: a calibration spec (`calibration_tokens`); chat_template: render it as conversations
    in the tokenizer's chat template (instruct models). With `cfg.e2e.epochs`, the end-to-end
    scale stage runs on the finished directory (`finetune_output`), streamed one block at a time
    or on the whole model in memory: `e2e_streamed` "on", "off", or "auto" (streamed when the
    whole model in fp32 would not fit in the host budget, or on a GPU in half of its free
    memory; `gsq.plan.e2e_plan`).

    Under `torchrun --nproc-per-node N` the N processes quantize together, data parallel
    (`gsq.dist`: gloo with device "cpu", NCCL with "cuda", one GPU per rank); only rank 0
    writes `out`, which every rank's result then reads.
    """
    from gsq.plan import E2E_MODES

    if e2e_streamed not in E2E_MODES:
        raise GSQError(f"e2e_streamed must be one of {', '.join(E2E_MODES)}; got "
                       f"{e2e_streamed!r}")
    dev = dist.rank_device(resolve_device(device))
    with dist.launched(dev) as world:
        if world.size > 1 and out is None:
            raise GSQError("several processes (torchrun) need an output directory (--out)")
        if world.size > 1 and resume:
            raise GSQError("--resume is not supported with several processes yet; resume the "
                           "partial run with one process")
        return _quantize(model_source, cfg, calib, out, str(dev), progress and world.is_main,
                         overwrite, resume, export_formats, chat_template, max_host_memory,
                         e2e_streamed)


def _quantize(model_source: str, cfg: QuantizeConfig, calib: str | None, out: str | Path | None,
              device: str, progress: bool, overwrite: bool, resume: bool,
              export_formats: tuple[str, ...], chat_template: bool,
              max_host_memory: float | None, e2e_streamed: str) -> QuantizeResult:
    if out is None:
        with tempfile.TemporaryDirectory(prefix="gsq-quantize-") as tmp:
            result = quantize(model_source, cfg, calib, Path(tmp) / "model", device, progress,
                              export_formats=export_formats, chat_template=chat_template,
                              max_host_memory=max_host_memory, e2e_streamed=e2e_streamed)
            return QuantizeResult(result.model, result.tokenizer, result.records, result.report,
                                  None)
    t0 = time.perf_counter()
    dev = resolve_device(device)
    reset_peak_memory(dev)
    out = check_output_path(out, overwrite)
    check_source_architecture(model_source, cfg, tuple(export_formats))
    streamed = open_model(model_source)
    adapter = adapter_for(streamed.model.config.model_type)
    # fail on a spec that cannot apply before tokenizing
    check_module_specs(streamed.model, adapter, cfg)
    tokens = calibration_tokens(streamed.tokenizer, calib, chat_template)
    inputs = RunInputs(streamed, adapter, calibration_windows(tokens, cfg), cfg, dev)
    predicted = plan_for(streamed.model, adapter, cfg, dev, max_host_memory, e2e_streamed)
    on_disk = predicted["activations_spilled"]
    if on_disk:
        log.info("activations (%.2f GiB at the peak) exceed the host budget of %.2f GiB: "
                 "memory-mapped files in %s", predicted["activation_gib"],
                 predicted["host_budget_gib"], partial_path(out))

    def complete_report(report: dict, modules: dict) -> dict:
        report.update({"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size,
                       **modules_report(cfg, modules), "device": str(dev),
                       "activations": ("shared" if dist.world().size > 1 else
                                       "disk" if on_disk else "memory"),
                       "model": model_source, "calib": calib or "mix",
                       "chat_template": chat_template, "wall_seconds": time.perf_counter() - t0,
                       **peak_memory(dev), **moe_report(cfg, report)})
        report["plan"] = compare_plan(predicted, report, partial_path(out))
        return report

    def end_to_end(folder: Path, report: dict) -> dict:
        """The e2e stage on the block loop's completed directory, still inside OUT.partial (a
        kill leaves it there for --resume); done already if the report has its entry (a kill
        after the stage rewrote the directory)."""
        if "e2e" in report:
            return report
        return finetune_output(folder, model_source, inputs.windows, cfg, dev, progress,
                               predicted["e2e_streamed"], predicted["e2e_activations_spilled"],
                               streamed)

    report = run_streamed(inputs, out, progress, resume, overwrite, on_disk, complete_report,
                          end_to_end if cfg.e2e.epochs else None)
    return QuantizeResult(None, streamed.tokenizer, None, report, out)


EXPORT_FORMATS = ("gguf", "compressed-tensors")


def export(qdir: str | Path, out: str | Path, format: str = "gguf", *, overwrite: bool = False,
           **options) -> dict | None:
    """Write the quantized directory `qdir` to `out` as a llama.cpp GGUF file (options of
    `gsq.export.gguf_file.export_gguf`: float_type, type_overrides, lossy; returns its report)
    or a compressed-tensors directory (option container_bits)."""
    if format == "gguf":
        from gsq.export.gguf_file import export_gguf

        return export_gguf(qdir, out, overwrite=overwrite, **options)
    if format == "compressed-tensors":
        from gsq.export.compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(qdir, out, overwrite=overwrite, **options)
    raise GSQError(f"export format must be one of {', '.join(EXPORT_FORMATS)}; got '{format}'")


def refine(quantized: str | Path, base: str, out: str | Path, **options) -> RefineResult:
    """Refine the codes of a llama.cpp GGUF file with GSQ against its full-precision `base`
    (`gsq.refine.refine_gguf`: cfg, calib, scales, device, progress, overwrite,
    heldout_samples)."""
    return refine_gguf(quantized, base, out, **options)
