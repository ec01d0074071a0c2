"""Host-side calibration activations: in RAM, or in memory-mapped files when they exceed the
host-memory budget (`gsq quantize --max-host-memory`).

The block loop allocates every host tensor of hidden states (block inputs, full-precision
targets, the next block's inputs; `(N, T, hidden)` fp32) through an `ActivationStore`. In RAM mode
that is `torch.empty`; in disk mode each tensor is a file under `folder` mapped with
`torch.from_file(shared=True)`, so the kernel pages it in and out and the process holds only the
pages in use. A spill file is deleted when its tensor is garbage-collected; `persist` keeps a
tensor as a named file (a hard link when it already is one), `open` maps or reads it back, so the
inputs of the next block survive a killed run (`gsq.io.partial`).

Shared mode (`shared=True`, the store of a run of several processes on one node, `gsq.dist`):
every rank makes the same allocations in the same order, so the n-th tensor of every rank maps
the same file, `spill/<n>.bin` (created by whichever rank comes first, never truncated below its
size, so no rank erases another's rows). Each rank writes the rows it computed, a barrier
follows (`gsq.calib.objectives.map_batches`), and every rank then reads any row: the node holds
one copy, in the page cache, instead of one per process. The folder must be one both ranks see
(the output's filesystem): one node only.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
import weakref
from pathlib import Path

import torch
from torch import Tensor

_CHUNK_BYTES = 64 * 2**20  # host copies of device tensors are written in pieces of this size


class ActivationStore:
    """Allocates host activation tensors in RAM (`on_disk=False`) or as files in `folder`,
    private to this process or (`shared`, implies on disk) mapping the files every rank maps.

    `ram_bytes` / `file_bytes`: bytes allocated so far in private RAM / in files (a shared
    file counts in every rank's `file_bytes`, once per node on the disk)."""

    def __init__(self, folder: str | Path | None = None, on_disk: bool = False,
                 shared: bool = False) -> None:
        on_disk = on_disk or shared
        if on_disk and folder is None:
            raise ValueError("an on-disk activation store needs a folder")
        self.folder = Path(folder) if folder is not None else None
        self.on_disk, self.shared = on_disk, shared
        self.ram_bytes = self.file_bytes = 0
        self._files: dict[int, Path] = {}  # id(storage data_ptr) -> spill file backing it
        self._count = itertools.count()
        if on_disk:
            self._spill_dir.mkdir(parents=True, exist_ok=True)

    @property
    def _spill_dir(self) -> Path:
        return self.folder / "spill"

    def clear_spill(self) -> None:
        """Delete spill files left by a killed process (they hold no state worth keeping)."""
        if self.folder is not None and self._spill_dir.is_dir():
            for path in self._spill_dir.iterdir():
                path.unlink(missing_ok=True)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """An uninitialised host tensor: in RAM, or backed by a new spill file."""
        numel = 1
        for size in shape:
            numel *= size
        nbytes = max(numel, 1) * dtype.itemsize
        if not self.on_disk:
            self.ram_bytes += nbytes
            return torch.empty(shape, dtype=dtype)
        self.file_bytes += nbytes
        path = self._new_file(nbytes)
        tensor = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        key = tensor.untyped_storage().data_ptr()
        self._files[key] = path
        weakref.finalize(tensor, self._forget, key, path)
        return tensor

    def _new_file(self, nbytes: int) -> Path:
        """A file of `nbytes` (sparse until written): a new private one, or the shared one of this
        allocation's number, which another rank may have created (and written) already."""
        number = next(self._count)
        if not self.shared:
            path = self._spill_dir / f"{number:06d}-{uuid.uuid4().hex[:8]}.bin"
            with open(path, "wb") as f:
                f.truncate(nbytes)
            return path
        path = self._spill_dir / f"{number:06d}.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < nbytes:  # every rank asks for the same size
                os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        return path

    def _forget(self, key: int, path: Path) -> None:
        self._files.pop(key, None)
        with contextlib.suppress(OSError):
            path.unlink()

    def like(self, x: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
        """`empty` with x's dtype (and shape unless given)."""
        return self.empty(tuple(x.shape) if shape is None else shape, x.dtype)

    def persist(self, x: Tensor, path: str | Path) -> None:
        """Write `x` (any device) as raw bytes to `path`, durably (fsync); a hard link when `x` is
        a whole spill file already."""
        path = Path(path)
        path.unlink(missing_ok=True)
        spill = self._files.get(x.untyped_storage().data_ptr()) if x.device.type == "cpu" else None
        whole = spill is not None and x.is_contiguous() and x.storage_offset() == 0
        if whole and x.untyped_storage().nbytes() == x.numel() * x.element_size():
            os.link(spill, path)
            _fsync(path)
            return
        flat = x.detach().reshape(-1)
        step = max(1, _CHUNK_BYTES // x.element_size())
        with open(path, "wb") as f:
            for start in range(0, flat.numel(), step):
                chunk = flat[start:start + step].cpu().contiguous()
                f.write(chunk.view(torch.uint8).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())

    def open(self, path: str | Path, shape: tuple[int, ...],
             dtype: torch.dtype = torch.float32) -> Tensor:
        """A tensor persisted by `persist`: mapped read-only-to-disk (private copy-on-write) in
        disk mode, read into RAM otherwise."""
        numel = 1
        for size in shape:
            numel *= size
        if os.path.getsize(path) != numel * dtype.itemsize:
            raise ValueError(f"'{path}' does not hold {list(shape)} {dtype} values")
        mapped = torch.from_file(str(path), shared=False, size=numel, dtype=dtype).view(shape)
        return mapped if self.on_disk else mapped.clone()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
