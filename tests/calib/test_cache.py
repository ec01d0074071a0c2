"""Host activations in RAM or in memory-mapped spill files: same values, files cleaned up,
persisted inputs read back bit for bit."""

from __future__ import annotations

import gc

import pytest
import torch

from gsq.calib.cache import ActivationStore
from gsq.calib.objectives import map_batches


def test_disk_tensors_are_files_removed_with_their_tensor(tmp_path):
    store = ActivationStore(tmp_path, on_disk=True)
    x = store.empty((3, 4, 5))
    files = list((tmp_path / "spill").iterdir())
    assert len(files) == 1 and files[0].stat().st_size == 3 * 4 * 5 * 4
    x.copy_(torch.arange(60, dtype=torch.float32).view(3, 4, 5))
    assert torch.equal(torch.from_file(str(files[0]), size=60, dtype=torch.float32).view(3, 4, 5),
                       x)
    del x
    gc.collect()
    assert list((tmp_path / "spill").iterdir()) == []


def test_ram_store_makes_no_files(tmp_path):
    store = ActivationStore(tmp_path, on_disk=False)
    store.empty((2, 2))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="needs a folder"):
        ActivationStore(None, on_disk=True)


@pytest.mark.parametrize("on_disk", [False, True])
def test_map_batches_into_a_store_equals_torch_cat(tmp_path, on_disk):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 8, generator=gen)
    w = torch.randn(8, 5, generator=gen)
    store = ActivationStore(tmp_path, on_disk=on_disk)
    got = map_batches(lambda c: torch.tanh(c @ w), x, 3, store=store)
    assert torch.equal(got, map_batches(lambda c: torch.tanh(c @ w), x, 3))
    assert got.shape == (7, 3, 5)


@pytest.mark.parametrize("on_disk", [False, True])
def test_persist_and_open_are_exact(tmp_path, on_disk):
    store = ActivationStore(tmp_path, on_disk=on_disk)
    x = store.empty((4, 6))
    x.copy_(torch.randn(4, 6, generator=torch.Generator().manual_seed(1)))
    store.persist(x, tmp_path / "in.f32")
    store.persist(x[1:], tmp_path / "part.f32")  # a view: written, not linked
    back = store.open(tmp_path / "in.f32", (4, 6))
    assert torch.equal(back, x) and torch.equal(store.open(tmp_path / "part.f32", (3, 6)), x[1:])
    del x
    gc.collect()
    assert torch.equal(store.open(tmp_path / "in.f32", (4, 6)), back)  # outlives the spill file
    with pytest.raises(ValueError, match="does not hold"):
        store.open(tmp_path / "in.f32", (5, 6))


def test_clear_spill_removes_leftovers(tmp_path):
    (tmp_path / "spill").mkdir()
    (tmp_path / "spill" / "old.bin").write_bytes(b"x")
    ActivationStore(tmp_path, on_disk=False).clear_spill()
    assert list((tmp_path / "spill").iterdir()) == []


def test_shared_stores_map_the_same_files_in_allocation_order(tmp_path):
    """Two shared stores on one folder (two ranks): the n-th tensor of each is the same file, rows
    written through either are seen by both, a late allocation keeps rows written already, and
    the bytes count as files, not private RAM."""
    rank0, rank1 = (ActivationStore(tmp_path, shared=True) for _ in range(2))
    a0 = rank0.empty((4, 3))
    a0[:2] = 1.0  # rank 0's rows, written before rank 1 allocates
    a1 = rank1.empty((4, 3))
    a1[2:] = 2.0
    assert torch.equal(a0, a1) and float(a0.sum()) == 6 + 12
    b0, b1 = rank0.empty((2, 2)), rank1.empty((2, 2))
    b0.fill_(3.0)
    assert torch.equal(b1, b0)
    assert len(list((tmp_path / "spill").iterdir())) == 2
    assert rank0.ram_bytes == rank1.ram_bytes == 0
    assert rank0.file_bytes == rank1.file_bytes == (12 + 4) * 4
    del a0, a1, b0, b1
    gc.collect()
    assert list((tmp_path / "spill").iterdir()) == []
