"""`gsq.gguf.read_gguf` against gguf's own `GGUFReader` on files both can read, and on a file with
Q2_0 tensors (which gguf 0.19 refuses): same keys, tensor infos, offsets and bytes; broken files
give one-line GSQErrors."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from gsq.errors import GSQError
from gsq.gguf import field_value, missing_types, read_gguf, tensor_offsets, type_id

ROWS, COLS = 3, 256


def _write(path, types: dict[str, str], align: int | None = None) -> dict[str, np.ndarray]:
    """A small GGUF file: a few keys (a string array among them) and one tensor per type with
    random bytes. Returns the bytes written by tensor name."""
    from gsq.gguf import row_bytes

    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, "llama")
    if align is not None:
        writer.add_custom_alignment(align)
    writer.add_block_count(2)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "déf", ""])
    writer.add_key_value("tokenizer.ggml.token_type", [1, 3, 1, 1], GGUFValueType.ARRAY,
                         sub_type=GGUFValueType.INT32)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    written = {}
    for name, qtype in types.items():
        data = rng.integers(0, 256, (ROWS, row_bytes(type_id(qtype), COLS)), dtype=np.uint8)
        written[name] = data
        writer.add_tensor_info(name, [ROWS, COLS], np.dtype(np.int8), data.nbytes,
                               raw_dtype=type_id(qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in written.values():
        writer.write_tensor_data(data)
    writer.close()
    return written


@pytest.mark.parametrize("align", [None, 64])
def test_read_agrees_with_gguf_reader(tmp_path, align):
    path = tmp_path / "known.gguf"
    written = _write(path, {"a.weight": "Q4_0", "b.weight": "Q6_K", "c.weight": "F16"}, align)
    fields, tensors = read_gguf(path)
    ref = GGUFReader(path)
    assert {k: f.contents() for k, f in fields.items()} == \
        {k: f.contents() for k, f in ref.fields.items()}
    assert [(t.name, t.type_name, t.offset) for t in tensors] == \
        [(t.name, t.tensor_type.name, t.data_offset) for t in ref.tensors]
    for t in tensors:
        assert t.shape == (ROWS, COLS) and np.array_equal(t.data, written[t.name]), t.name
    assert tensor_offsets(path) == {t.name: t.data_offset for t in ref.tensors}


def test_reads_types_the_gguf_package_lacks(tmp_path):
    path = tmp_path / "q2_0.gguf"
    written = _write(path, {"a.weight": "Q2_0", "b.weight": "Q4_0"})
    with pytest.raises(ValueError):
        GGUFReader(path)  # the reason gsq reads the tensor infos itself
    fields, tensors = read_gguf(path)
    assert field_value(fields["tokenizer.ggml.tokens"]) == ["a", "bc", "déf", ""]
    assert field_value(fields["GGUF.tensor_count"]) == 2
    assert field_value(fields["llama.block_count"]) == 2
    assert [t.type_name for t in tensors] == ["Q2_0", "Q4_0"] and missing_types(tensors) == ["Q2_0"]
    raw = np.fromfile(path, np.uint8)
    for t in tensors:
        assert np.array_equal(t.data, written[t.name])
        assert np.array_equal(raw[t.offset:t.offset + t.data.nbytes], written[t.name].ravel())


def test_broken_files_are_refused(tmp_path):
    path = tmp_path / "ok.gguf"
    _write(path, {"a.weight": "Q4_0"})
    raw = path.read_bytes()
    for name, data, needle in [("cut.gguf", raw[:-40], "runs past the end"),
                               ("head.gguf", raw[:40], "truncated or not GGUF"),
                               ("text.gguf", b"not a gguf file at all", "truncated or not GGUF"),
                               ("empty.gguf", b"", "truncated or not GGUF")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(GSQError, match=needle):
            read_gguf(tmp_path / name)
    with pytest.raises(GSQError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")
