"""Data parallel over the processes of a `torchrun` launch (torch.distributed), and nothing more.

`torchrun --nproc-per-node N -m gsq.cli quantize ...` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK in their environment; `launched` joins them into one process group (gloo on the CPU,
NCCL on GPUs with one GPU per rank, cuda:LOCAL_RANK) for the length of a command and tears it
down afterwards. Without torchrun (or with one process) the world is one process, nothing is
initialised and every function here is a no-op.

What ranks share (the block loop, `gsq.calib.sequential`, `gsq.quant.trainer`):
  * work items (GPTQ windows of a Hessian, micro-batches of an optimiser step) are dealt out by a
    fixed rule, item i -> rank i mod N (`World.owns`), with the global index i kept, so the noise of
    a micro-batch (seeded by its index) does not depend on N;
  * partial sums (Hessian sums and token counts, gradients, losses) are summed over ranks
    (`all_reduce_sum`), so every rank holds the same totals and takes the same steps;
  * values every rank computes alike (held-out losses) are taken from rank 0 (`from_rank0`), so
    that decisions on them (keep-best) are the same on every rank even where a device's kernels
    are not bitwise reproducible;
  * activations pushed through a block (`gsq.calib.objectives.map_batches` with `shard`): batch
    i of the calibration windows is computed by rank i mod N only, and its rows reach the other
    ranks through a node-wide memory-mapped store (`gsq.calib.cache.ActivationStore`, `shared`:
    each rank writes its rows into the same files, then a `barrier`) or, without one, are sent
    from their rank (`broadcast_from`); either way every rank holds the bits one process
    computes. The shared store is one folder on one node: multi-node launches are not supported;
  * small per-rank facts (peak memory, rows computed) reach every rank with `all_gather_object`,
    for rank 0's report.

Expert parallel (MoE layers, GPTQ only): expert e of a layer is owned by rank e mod N
(`World.owner`). Each rank accumulates every expert's Hessian partial sums over its own windows
(data parallel, as above); each expert's sums are then reduced to its owner alone (`reduce_sum`;
token counts are still summed everywhere), the owner solves GPTQ for the experts it owns, batched
over them, and the codes and scales go from each owner to every rank (`broadcast_object`), so
every rank's block holds the same quantized experts for the next block and rank 0 writes them.
Every expert is thus calibrated on all the tokens the router sends it, summed at its owner: gsq
moves the tokens' second-moment statistics (one (in, in) sum per expert) to the expert instead of
the tokens themselves, which is what GPTQ needs and far less data than an all-to-all of
activations. Not expert parallel: GSQ's training of the experts (the MLP stage trains all
experts of a layer together on the block-output objective, data parallel over micro-batches,
every rank holding every expert); sharding that training would need the all-to-all of tokens to
their experts' ranks (and back) in every forward and backward pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's rank among `size` processes (0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs and prints."""
        return self.rank == 0

    def owner(self, index: int) -> int:
        """The rank of work item (or MoE expert) `index`: index mod size."""
        return index % self.size

    def owns(self, index: int) -> bool:
        """Whether work item `index` (global numbering) is this rank's."""
        return self.owner(index) == self.rank


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world() -> World:
    """The process group in use (a single process when none is initialised)."""
    if _active():
        return World(tdist.get_rank(), tdist.get_world_size())
    return World()


def launch_world() -> World:
    """The world torchrun launched this process into (from its environment), initialised or not."""
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: a CUDA device becomes cuda:LOCAL_RANK under a launch of several
    processes (one GPU per rank); the CPU stays the CPU."""
    if device.type != "cuda" or launch_world().size == 1:
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def launched(device: torch.device) -> Iterator[World]:
    """Joins the torchrun launch for the block (gloo for `device` cpu, NCCL for cuda) and leaves
    it afterwards; a group already initialised by the caller is used as it is and left alone."""
    launch = launch_world()
    if launch.size == 1 or _active():
        yield world()
        return
    if device.type == "cuda":
        torch.cuda.set_device(rank_device(device))
        tdist.init_process_group("nccl", device_id=rank_device(device))
    else:
        tdist.init_process_group("gloo")
    try:
        yield world()
    finally:
        tdist.destroy_process_group()


def _comm_device() -> torch.device:
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _multi() -> bool:
    return _active() and tdist.get_world_size() > 1


def _packed(tensors: Sequence[Tensor], collective: Callable[[Tensor], bool]) -> None:
    """Run `collective` on one flat buffer per dtype of `tensors`, and copy the buffer back into
    them where it returns True (the ranks that receive the result)."""
    comm = _comm_device()
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).to(comm) for t in group])
        if not collective(flat):
            continue
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """Replace each tensor by its sum over ranks, in place; one all-reduce per dtype.

    Elementwise sums only: with two ranks, a + b is exact, the value a single process gets when it
    adds the same two partial sums."""
    if not _multi():
        return

    def collective(flat: Tensor) -> bool:
        tdist.all_reduce(flat)
        return True

    _packed(tensors, collective)


def reduce_sum(tensors: Sequence[Tensor], dst: int) -> None:
    """Replace each tensor by its sum over ranks on rank `dst` alone, in place (elsewhere they
    are left undefined: they were partial sums to give away); one reduce per dtype. The same
    elementwise sums as `all_reduce_sum` (a + b with two ranks), received by one rank."""
    if not _multi():
        return

    def collective(flat: Tensor) -> bool:
        tdist.reduce(flat, dst)
        return tdist.get_rank() == dst

    _packed(tensors, collective)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` (picklable; tensors in it should be on the CPU) on every rank."""
    if not _multi():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def sum_gradients(params: Sequence[Tensor], *extra: Tensor) -> None:
    """Sum the gradients of `params` (and the tensors `extra`, e.g. a loss total) over ranks; a
    rank that backpropagated nothing contributes zeros."""
    if not _multi():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum([*(p.grad for p in params), *extra])


def from_rank0(values: Sequence[float]) -> list[float]:
    """Rank 0's values on every rank (float64)."""
    if not _multi():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    tdist.broadcast(t, src=0)
    return t.cpu().tolist()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _multi():
        tdist.barrier()


def broadcast_from(tensor: Tensor, src: int) -> None:
    """Overwrite `tensor` (any device) on every rank with rank `src`'s values, in place: the same
    bits on every rank."""
    if not _multi():
        return
    comm = _comm_device()
    direct = tensor.device == comm and tensor.is_contiguous()
    buf = tensor if direct else tensor.contiguous().to(comm)  # a copy on the backend's device
    tdist.broadcast(buf, src=src)
    if buf is not tensor:
        tensor.copy_(buf)


def all_gather_object(value: object) -> list:
    """Every rank's `value` (picklable, small), in rank order, on every rank; [value] in one
    process."""
    if not _multi():
        return [value]
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, value)
    return out
