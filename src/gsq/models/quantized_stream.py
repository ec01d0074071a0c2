"""A gsq quantized directory streamed one block at a time into a model skeleton
(`QuantizedBlocks`, a `BlockLoader`), and the tensors that change when its scales and norm
weights do (`rewritten_files`), for the end-to-end scale stage streamed after the block loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from gsq.errors import GSQError
from gsq.io.quantized_dir import CODES_FILE, CodesFile, scale_tensor
from gsq.models.base import ModelAdapter
from gsq.models.quantized import apply_records
from gsq.models.registry import adapter_for
from gsq.models.streaming import SafetensorsSource, StreamedBlocks, StreamedModel
from gsq.quant.types import QuantizedWeight

CPU = torch.device("cpu")


class QuantizedBlocks(StreamedBlocks):
    """The block loop's loader (`BlockLoader`) over a gsq quantized directory opened as a
    skeleton (`open_model(dir)`): a block's tensors are read from its shard (fp32), then its
    quantized linears are set to `scale * codes` exactly from the codes file (a bf16 shard holds
    only their rounding). `records` holds the records of the block loaded, by full name."""

    def __init__(self, streamed: StreamedModel, adapter: ModelAdapter, codes: CodesFile) -> None:
        super().__init__(streamed.model, adapter, streamed.source)
        self.codes = codes
        self.records: dict[str, QuantizedWeight] = {}

    def block_records(self, index: int) -> list[str]:
        prefix = self.block_prefix(index)
        return [name for name in self.codes.specs if name.startswith(prefix)]

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        super().load(index, block, device)
        self.records = self.codes.read(self.block_records(index))
        apply_records(self.model, self.records)

    def release(self, index: int, block: nn.Module) -> None:
        self.records = {}
        super().release(index, block)


def open_quantized(path: str | Path) -> QuantizedBlocks:
    """A gsq quantized directory as a skeleton whose blocks stream from its files."""
    from gsq.models.streaming import open_model

    streamed = open_model(str(path))
    if not isinstance(streamed.source, SafetensorsSource):
        raise GSQError(f"'{path}' holds no safetensors shards to stream")
    return QuantizedBlocks(streamed, adapter_for(streamed.model.config.model_type),
                           CodesFile(path))


# (records of a loaded block by full name) -> the new scale `(out, n_groups)` of each record
# whose scales change, by full name
NewScales = Callable[[dict[str, QuantizedWeight]], dict[str, Tensor]]


@dataclass
class _Unit:
    """What `rewritten_files` loads at a time: block `index`, or a module outside the blocks."""

    prefix: str
    module: nn.Module
    index: int | None = None


def rewritten_files(loader: QuantizedBlocks, new_scales: NewScales,
                    norm_multipliers: dict[str, Tensor]) -> Iterator[tuple[str, dict]]:
    """The tensors of a quantized directory that change when records get new scales and norm
    weights (fp32) are multiplied by `norm_multipliers` (by module name): (file name, {tensor
    name: value}) per changed file (for `gsq.io.quantized_dir.rewrite_tensors`). Shards hold
    the modules as `StreamedBlocks` writes them, in the directory's dtypes, from a block loaded
    with its new `scale * codes`, one block at a time; the codes file's new scales come last."""
    model, source = loader.model, loader.source
    units = _units(loader, norm_multipliers)
    last = {name: u for u, unit in enumerate(units) for name in source.files_of(unit.prefix)}
    pending: dict[str, dict[str, Tensor]] = {}
    scales: dict[str, Tensor] = {}
    for u, unit in enumerate(units):
        _load(loader, unit)
        changed = {n: dataclasses.replace(loader.records[n], scale=s)
                   for n, s in new_scales(loader.records).items()}
        apply_records(model, changed)
        scales.update({f"{n}.scale": scale_tensor(qw) for n, qw in changed.items()})
        with torch.no_grad():
            for name, m in norm_multipliers.items():
                if (name + ".").startswith(unit.prefix):
                    weight = model.get_submodule(name).weight
                    weight.copy_(weight * m)
        for key, value in source.saved(model, unit.prefix).items():
            pending.setdefault(source.files[key].name, {})[key] = value
        _release(loader, unit)
        yield from ((name, pending.pop(name, {})) for name, v in last.items() if v == u)
    yield CODES_FILE, scales


def _units(loader: QuantizedBlocks, norm_multipliers: dict[str, Tensor]) -> list[_Unit]:
    """The blocks with records or norms to change, then the norms outside the blocks."""
    blocks = loader.adapter.blocks(loader.model)
    units = [_Unit(loader.block_prefix(i), block, i) for i, block in enumerate(blocks)]
    units = [u for u in units if loader.block_records(u.index)
             or any(n.startswith(u.prefix) for n in norm_multipliers)]
    inside = [loader.block_prefix(i) for i in range(len(blocks))]
    return units + [_Unit(name + ".", loader.model.get_submodule(name))
                    for name in norm_multipliers if not any(name.startswith(p) for p in inside)]


def _load(loader: QuantizedBlocks, unit: _Unit) -> None:
    if unit.index is None:
        loader.load_module(loader.model, unit.module, CPU)
    else:
        loader.load(unit.index, unit.module, CPU)


def _release(loader: QuantizedBlocks, unit: _Unit) -> None:
    if unit.index is None:
        loader.release_module(loader.model, unit.module)
    else:
        loader.release(unit.index, unit.module)
