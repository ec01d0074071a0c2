"""A quantize run streamed from disk into a partial directory, and resumed from one.

`run_streamed` ties the pieces together: the model skeleton and its weight source
(`gsq.models.streaming`), the block loop (`gsq.calib.sequential.run_quantization`) loading one
block at a time, host activations in RAM or spilled to disk (`gsq.calib.cache`), and the partial
directory (`gsq.io.partial`) that receives each finished block (its output shard, its codes, the
next block's inputs) and becomes the output directory at the end.

Resuming is exact: every random draw derives from (seed, block, stage, ...), so a block depends only
on the config, its weights and its inputs, and those inputs are persisted bit for bit. A resumed run
writes the same bytes as an uninterrupted one on the same device type and software versions, which
the fingerprint checks together with the config, the model files and the calibration windows.

Under several processes (`gsq.dist`; one node) the activations live in one shared store, memory-
mapped files in the partial directory's activation folder that every rank maps
(`ActivationStore(shared=True)`): each rank computes and writes its share of the rows, so the node
holds one copy and not one per process. The report's `ranks` lists every process's peak memory,
windows propagated and activation bytes (`_rank_facts`); one entry for a single process.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gsq import dist
from gsq.calib.cache import ActivationStore
from gsq.calib.sensitivity import allocate_widths
from gsq.calib.sequential import Buffers, ResumePoint, run_quantization
from gsq.config import QuantizeConfig
from gsq.errors import GSQError
from gsq.io.partial import PartialRun, activation_folder, partial_path
from gsq.io.quantized_dir import REPORT_FILE, module_meta, records_to_tensors
from gsq.memory import rank_entries
from gsq.models.base import ModelAdapter
from gsq.models.streaming import StreamedBlocks, StreamedModel
from gsq.quant.types import QuantSpec

log = logging.getLogger(__name__)


@dataclass
class RunInputs:
    """Everything a streamed run works on."""

    streamed: StreamedModel
    adapter: ModelAdapter
    windows: dict[str, torch.Tensor]  # {train, val, gptq}: (N, T) token ids
    cfg: QuantizeConfig
    device: torch.device


def run_fingerprint(inputs: RunInputs) -> dict:
    """What a resumed run must share with the run that wrote the partial directory."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        gsq_version = version("gsq-quant")  # the distribution; `import gsq`
    except PackageNotFoundError:
        gsq_version = "unknown"
    windows = hashlib.sha256()
    for split in ("train", "val", "gptq"):
        windows.update(inputs.windows[split].to(torch.int64).numpy().tobytes())
    return {
        "config": inputs.cfg.to_dict(),
        "model": inputs.streamed.source.fingerprint(),
        "calibration": {"windows_sha256": windows.hexdigest()},
        "versions": {"gsq": gsq_version, "torch": torch.__version__,
                     "device": inputs.device.type},
    }


Finalize = Callable[[Path, dict], dict]  # (completed directory, report) -> report


def run_streamed(inputs: RunInputs, out: Path, progress: bool, resume: bool, overwrite: bool,
                 activations_on_disk: bool, complete_report: Callable[[dict, dict], dict],
                 finalize: Finalize | None = None) -> dict:
    """Quantize into `OUT.partial`, complete its `out/`, run `finalize` on it, then rename it to
    OUT and remove the partial directory.

    complete_report(run report, module metadata by name) -> the report.json to write.
    finalize(directory, report) -> report: a stage on the whole finished directory (the
    end-to-end scale stage), which may rewrite it; a resumed run whose block loop had completed
    runs only this. A GSQError removes the partial directory (nothing to resume); an interrupt
    or a crash keeps it for `--resume`.

    Under several processes (`gsq.dist`) only rank 0 writes (the partial directory, then OUT);
    the others run the same block loop and `finalize` (`_follow`) and return the report rank 0
    wrote. `out/` is completed only once every rank has finished its block loop."""
    if not dist.world().is_main:
        return _follow(inputs, out, progress, finalize)
    blocks_total = len(inputs.adapter.blocks(inputs.streamed.model))
    partial = PartialRun.open(out, run_fingerprint(inputs), blocks_total, resume, overwrite)
    try:
        if partial.completed:  # one process only: several cannot resume (`gsq.api.quantize`)
            log.info("resuming %s: the block loop had completed; running the stages after it",
                     partial.path)
            report = json.loads((partial.folder / REPORT_FILE).read_text())
        else:
            report, store = _quantize_into(partial, inputs, progress, activations_on_disk)
            _write_rest(partial, inputs)
            report["ranks"] = rank_entries(inputs.device, **_rank_facts(report, store))
            report = complete_report(report, partial.state["modules"])
            dist.barrier()  # every rank's block loop went through
            partial.complete(inputs.cfg.to_dict(), report, side_files_writer(inputs.streamed))
        dist.barrier()  # `out/` is complete
        if finalize is not None:
            report = finalize(partial.folder, report)
            dist.barrier()  # every rank is done with `out/` (it reads its report at the end)
        partial.publish(out, overwrite)
    except GSQError:
        partial.remove()
        raise
    except BaseException:
        partial.close()
        log.warning("partial run kept in %s: the same command with --resume continues it",
                    partial.path)
        raise
    dist.barrier()  # OUT is complete
    return report


def _follow(inputs: RunInputs, out: Path, progress: bool, finalize: Finalize | None) -> dict:
    """A rank other than 0: the block loop with the same collectives as rank 0, writing nothing
    but its rows of the shared activation store rank 0 prepared in OUT.partial, then `finalize`
    on the directory rank 0 completed; returns the report rank 0 wrote to OUT."""
    model, adapter = inputs.streamed.model, inputs.adapter
    dist.barrier()  # rank 0 opened the partial directory and emptied the shared store's folder
    store = ActivationStore(activation_folder(partial_path(out)), shared=True)
    loader = StreamedBlocks(model, adapter, inputs.streamed.source)
    cfg = inputs.cfg
    if cfg.bpw is not None:  # rank 0's widths (`allocate_widths` broadcasts them)
        cfg, _ = allocate_widths(model, adapter, inputs.windows, cfg, inputs.device, loader,
                                 progress)
    _, report = run_quantization(model, adapter, inputs.windows, cfg, inputs.device,
                                 progress, loader=loader, sink=lambda *block: None, store=store)
    rank_entries(inputs.device, **_rank_facts(report, store))  # to rank 0's report
    del store, report
    dist.barrier()  # rank 0 completes `out/` once every rank is here
    dist.barrier()  # `out/` is complete
    if finalize is not None:
        folder = partial_path(out) / "out"
        finalize(folder, json.loads((folder / REPORT_FILE).read_text()))
        dist.barrier()  # done with `out/`: rank 0 may rename it
    dist.barrier()  # OUT is complete
    return json.loads((out / REPORT_FILE).read_text())


def _rank_facts(report: dict, store: ActivationStore) -> dict:
    """This process's share of the work and of the activations, for `rank_entries`: windows it
    pushed through finished blocks, MoE experts whose GPTQ it solved (expert parallel), GiB of
    activations it allocated (over the run) in its own RAM and in files (shared ones: the same
    files on every rank, one copy on the node)."""
    return {"windows_propagated": report.pop("windows_propagated", 0),
            "experts_solved": report.pop("experts_solved", 0),
            "activations_private_gib": store.ram_bytes / 2**30,
            "activations_file_gib": store.file_bytes / 2**30}


def _quantize_into(partial: PartialRun, inputs: RunInputs, progress: bool,
                   activations_on_disk: bool) -> tuple[dict, ActivationStore]:
    """The block loop from block `partial.done` on, each finished block handed to the partial
    directory. Returns the run report (block entries of earlier sessions included) and the
    activation store (shared with the other ranks under several processes)."""
    model, adapter, cfg = inputs.streamed.model, inputs.adapter, inputs.cfg
    blocks_total = len(adapter.blocks(model))
    n_blocks = min(blocks_total, cfg.max_blocks or blocks_total)
    store = ActivationStore(partial.activation_folder, on_disk=activations_on_disk,
                            shared=dist.world().size > 1)
    store.clear_spill()
    dist.barrier()  # the shared store's folder is ready for the other ranks (`_follow`)
    loader = StreamedBlocks(model, adapter, inputs.streamed.source)
    earlier = list(partial.state["blocks"])
    report = {"blocks_quantized": n_blocks, "blocks_total": blocks_total, "quantize_seconds": 0.0}
    if partial.done:
        log.info("resuming %s: blocks 0-%d of %d finished earlier, continuing at block %d",
                 partial.path, partial.done - 1, n_blocks, partial.done)
        report["resumed_from_block"] = partial.done
    if partial.done < n_blocks:
        resume = None
        if partial.done:
            bufs = Buffers(*(store.open(path, shape) for path, shape in partial.inputs().values()),
                           store=store)
            resume = ResumePoint(partial.done, bufs)
        sink = _BlockWriter(partial, inputs, loader, store, n_blocks)
        allocation = None
        if cfg.bpw is not None:  # measured again on resume: deterministic, and global
            cfg, allocation = allocate_widths(model, adapter, inputs.windows, cfg, inputs.device,
                                              loader, progress)
        _, report = run_quantization(model, adapter, inputs.windows, cfg, inputs.device,
                                     progress, loader=loader, sink=sink, store=store,
                                     resume=resume)
        report["resumed_from_block"] = resume.start if resume else 0
        if allocation is not None:
            report["allocation"] = allocation
    report["blocks"] = earlier + report.get("blocks", [])
    return report, store


class _BlockWriter:
    """The block loop's sink: shard, codes and next inputs of a finished block, then commit."""

    def __init__(self, partial: PartialRun, inputs: RunInputs, loader: StreamedBlocks,
                 store: ActivationStore, n_blocks: int) -> None:
        self.partial, self.inputs, self.loader = partial, inputs, loader
        self.store, self.n_blocks = store, n_blocks

    def __call__(self, index, block, records, report, next_bufs: Buffers) -> None:
        from gsq.io.shards import entries_of

        source, model = self.inputs.streamed.source, self.inputs.streamed.model
        self.partial.write_shard(index, entries_of(source.saved(model,
                                                                self.loader.block_prefix(index))))
        self.partial.write_codes(index, records_to_tensors(records))
        shapes = {}
        if index + 1 < self.n_blocks:  # the last block's outputs feed nothing
            for split, path in self.partial.input_paths(index + 1).items():
                x = getattr(next_bufs, split)
                self.store.persist(x, path)
                shapes[split] = tuple(x.shape)
        modules = {name: module_meta(qw) for name, qw in records.items()}
        self.partial.commit_block(index, report, modules, shapes)


def _write_rest(partial: PartialRun, inputs: RunInputs) -> None:
    """Shards of the blocks left unquantized (`max_blocks`) and of everything outside blocks,
    copied from the source in its dtypes, tensor by tensor."""
    model, adapter, source = inputs.streamed.model, inputs.adapter, inputs.streamed.source
    prefixes = [adapter.first_block_prefix().format(i=i)
                for i in range(len(adapter.blocks(model)))]
    for index in range(partial.done, len(prefixes)):
        prefix = prefixes[index]
        partial.write_shard(index, source.passthrough(lambda k, p=prefix: k.startswith(p)))
    partial.write_shard(len(prefixes), source.passthrough(
        lambda k: not any(k.startswith(p) for p in prefixes)))


def modules_report(cfg: QuantizeConfig, modules: dict[str, dict]) -> dict:
    """Totals over the quantized modules' metadata: tensors, weights, bits per parameter, and
    with a GGUF target the tensor count per type and the fallback tensors."""
    numel = {name: m["shape"][0] * m["shape"][1] for name, m in modules.items()}
    specs = {name: QuantSpec(m["bits"], m["group_size"], m.get("target"))
             for name, m in modules.items()}
    total = sum(numel.values())
    report = {"quantized_tensors": len(modules), "quantized_weights": total,
              "bpp": sum(specs[n].bpp * numel[n] for n in modules) / total if total else
              float("nan")}
    if cfg.target is not None:
        types: dict[str, int] = {}
        for spec in specs.values():
            types[spec.target] = types.get(spec.target, 0) + 1
        report.update({"target": cfg.target, "target_types": types,
                       "fallback": {n: s.target for n, s in specs.items()
                                    if s.target != cfg.target}})
    return report


def side_files_writer(streamed: StreamedModel):
    """Writes config.json, generation_config.json and the tokenizer into a folder."""
    def write(folder: Path) -> None:
        model = streamed.model
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)
        if streamed.tokenizer is not None:
            streamed.tokenizer.save_pretrained(folder)
    return write
