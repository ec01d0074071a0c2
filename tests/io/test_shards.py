"""safetensors written tensor by tensor: read back by safetensors itself, and the checkpoint
index of a folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gsq.errors import GSQError
from gsq.io.shards import (
    INDEX_FILE,
    TensorEntry,
    checkpoint_files,
    entries_of,
    file_entries,
    read_header,
    write_index,
    write_safetensors,
)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "a.codes": torch.randint(-2, 2, (3, 64), generator=gen).to(torch.int8),
        "c.scale": torch.randn(3, 2, generator=gen),
        "d.half": torch.randn(9, generator=gen).half(),
        "e.empty": torch.zeros(0, 4),
        "f.scalar": torch.tensor(3.5),
    }


def test_written_file_reads_back_exactly(tmp_path):
    tensors = _tensors()
    size = write_safetensors(tmp_path / "x.safetensors", entries_of(tensors))
    back = load_file(str(tmp_path / "x.safetensors"))
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name
    assert size == sum(t.numel() * t.element_size() for t in tensors.values())
    assert not list(tmp_path.glob("*.part"))


def test_header_and_entries_of_a_file_written_by_safetensors(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    header = read_header(tmp_path / "ref.safetensors")
    assert {n: h["shape"] for n, h in header.items()} == {n: list(t.shape)
                                                          for n, t in tensors.items()}
    write_safetensors(tmp_path / "copy.safetensors", file_entries(tmp_path / "ref.safetensors"))
    with safe_open(str(tmp_path / "copy.safetensors"), "pt") as f:
        for name, value in tensors.items():
            assert torch.equal(f.get_tensor(name), value)


def test_loaded_tensor_must_match_its_entry(tmp_path):
    bad = TensorEntry("w", torch.float32, (2, 2), lambda: torch.zeros(2, 3))
    with pytest.raises(GSQError, match="expected torch.float32 \\[2, 2\\]"):
        write_safetensors(tmp_path / "x.safetensors", [bad])
    assert not (tmp_path / "x.safetensors").exists()


def test_index_and_checkpoint_files(tmp_path):
    tensors = _tensors()
    names = sorted(tensors)
    write_safetensors(tmp_path / "s1.safetensors", entries_of({n: tensors[n] for n in names[:3]}))
    write_safetensors(tmp_path / "s2.safetensors", entries_of({n: tensors[n] for n in names[3:]}))
    files = checkpoint_files(tmp_path)
    assert {n: p.name for n, p in files.items()} == {
        n: "s1.safetensors" if i < 3 else "s2.safetensors" for i, n in enumerate(names)}
    weight_map = write_index(tmp_path, ["s1.safetensors", "s2.safetensors"])
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["weight_map"] == weight_map
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    (tmp_path / "s2.safetensors").rename(tmp_path / "renamed.safetensors")
    assert checkpoint_files(tmp_path)[names[-1]].name == "s2.safetensors"  # the index decides
