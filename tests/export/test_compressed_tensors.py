"""compressed-tensors pack-quantized export: transformers loads s*codes bit-exactly.

Each exported checkpoint is loaded with `AutoModelForCausalLM.from_pretrained` and every quantized
weight compared bit-for-bit with gsq's `s*codes`; logits are compared with gsq's own dequantized
model. The packing is checked against an independent bit-stream reference of formats.md A.3, and
negative controls show that a mis-packed file or a padded (<= 0.17) packer is caught.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import gsq.export.compressed_tensors as ct
from gsq.errors import GSQError
from gsq.io.quantized_dir import is_quantized_dir, save_quantized
from gsq.models.quantized import apply_records, load_quantized
from gsq.quant.rtn import rtn_quantize
from gsq.quant.types import QuantSpec

pytest.importorskip("compressed_tensors")

UNQUANTIZED = "model.layers.0.self_attn.o_proj"  # left dense in every scenario: goes to `ignore`


def _uniform(bits, group):
    return lambda name: QuantSpec(bits, group)


def _mixed(name):
    """3-bit g32 attention, 2-bit g64 MLP, ternary g32 in block 1's MLP."""
    if name.startswith("model.layers.1.mlp"):
        return QuantSpec("ternary", 32)
    return QuantSpec(3, 32) if "self_attn" in name else QuantSpec(2, 64)


SCENARIOS = {
    "2bit": _uniform(2, 32),
    "3bit": _uniform(3, 32),
    "4bit": _uniform(4, 64),
    "ternary": _uniform("ternary", 32),
    "mixed": _mixed,
}


def _mirror_ternary(qw):
    """Ternary RTN scales come out positive; flip every other group (-s, -c: same s*c)."""
    if qw.spec.is_ternary:
        rows, groups = qw.scale.shape
        flip = (torch.arange(rows)[:, None] + torch.arange(groups)[None, :]) % 2 == 0
        qw.scale = torch.where(flip, -qw.scale, qw.scale)
        sign = torch.where(flip, -1, 1).repeat_interleave(qw.spec.group_size, dim=1)
        qw.codes = (qw.codes * sign).to(torch.int8)
    return qw


def _quantize(model, spec_for):
    """RTN records for every Linear but lm_head and UNQUANTIZED; the model gets W = s*codes."""
    records = {name: _mirror_ternary(rtn_quantize(mod.weight, spec_for(name)))
               for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and name not in ("lm_head", UNQUANTIZED)}
    apply_records(model, records)
    return records


@pytest.fixture(scope="module")
def qdirs(tmp_path_factory, tiny_llama, byte_tokenizer):
    """Factory: gsq directory (and records) for a scenario and checkpoint dtype, built once."""
    cache = {}

    def make(scenario, dtype=torch.float32):
        if (scenario, dtype) not in cache:
            model = tiny_llama(0).to(dtype)
            records = _quantize(model, SCENARIOS[scenario])
            out = tmp_path_factory.mktemp("gsq") / f"{scenario}-{str(dtype)[6:]}"
            save_quantized(out, model, byte_tokenizer, records, {"scenario": scenario}, {})
            cache[scenario, dtype] = (out, records)
        return cache[scenario, dtype]

    return make


def _load(path, dequantize=False):
    """transformers' default path (decompress on first forward) or load-time dequantize."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if not dequantize:
        return AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with warnings.catch_warnings():  # "quantization_config from the model will be used"
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(
            str(path), quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():  # the first forward also decompresses packed weights (default path)
        return model(TOKENS).logits.float()


def _mismatched(model, records):
    """Quantized modules whose loaded weight is not bit-equal to s*codes in the model dtype."""
    _logits(model)
    bad = []
    for name, qw in records.items():
        weight = model.get_submodule(name).weight
        if not torch.equal(weight, qw.dequantize(weight.dtype)):
            bad.append(name)
    return bad


# ---------------------------------------------------------------------------------------------
# loaded through transformers: exact weights, matching logits


CASES = [("2bit", None), ("2bit", 4), ("3bit", None), ("3bit", 4), ("4bit", None),
         ("ternary", None), ("ternary", 4), ("mixed", None), ("mixed", 4), ("mixed", 8)]


@pytest.mark.parametrize(("scenario", "container"), CASES)
def test_transformers_loads_exact_weights(qdirs, tmp_path, scenario, container):
    qdir, records = qdirs(scenario)
    out = tmp_path / "ct"
    report = ct.export_compressed_tensors(qdir, out, container_bits=container)

    loaded = _load(out)
    assert _mismatched(loaded, records) == []
    reference, _, _ = load_quantized(qdir)  # gsq's own dequantized model, fp32
    torch.testing.assert_close(_logits(loaded), _logits(reference), rtol=1.6e-2, atol=1e-2)
    dense = dict(reference.named_parameters())
    for name, param in loaded.named_parameters():  # the unquantized tensors are copied unchanged
        if name.rpartition(".")[0] not in records:
            assert torch.equal(param, dense[name]), name

    if len(report["config_groups"]) == 1:  # transformers' load-time dequantize path (one scheme)
        assert _mismatched(_load(out, dequantize=True), records) == []


@pytest.mark.parametrize(("scenario", "container"), CASES)
def test_written_tensors_and_config(qdirs, tmp_path, scenario, container):
    qdir, records = qdirs(scenario)
    out = tmp_path / "ct"
    report = ct.export_compressed_tensors(qdir, out, container_bits=container)

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    import compressed_tensors

    assert qc["version"] == compressed_tensors.__version__
    assert config["gsq_export"]["packing_layout"] == "dense"
    assert config["gsq_export"]["compressed_tensors_version"] == compressed_tensors.__version__
    assert qc["ignore"] == [UNQUANTIZED, "lm_head"]

    tensors = load_file(str(out / "model.safetensors"))
    groups = {}
    for name, qw in records.items():
        bits = ct.stored_bits(qw, container)
        groups.setdefault((bits, qw.spec.group_size), []).append(name)
        out_f, in_f = qw.shape
        assert f"{name}.weight" not in tensors
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        assert tensors[f"{name}.weight_packed"].shape == (out_f, -(-in_f * bits // 32))
        assert tensors[f"{name}.weight_scale"].shape == (out_f, in_f // qw.spec.group_size)
        assert tensors[f"{name}.weight_shape"].tolist() == [out_f, in_f]
    assert f"{UNQUANTIZED}.weight" in tensors

    written = {(g["weights"]["num_bits"], g["weights"]["group_size"]): g["targets"]
               for g in qc["config_groups"].values()}
    assert set(written) == set(groups)
    for scheme, targets in written.items():
        assert targets == (["Linear"] if len(groups) == 1 else sorted(groups[scheme]))

    native = {"2bit": {2}, "3bit": {3}, "4bit": {4}, "ternary": {2}, "mixed": {2, 3}}[scenario]
    expected = {max(b, container or 0) for b in native}
    assert {g["num_bits"] for g in report["config_groups"].values()} == expected

    assert not is_quantized_dir(out)  # gsq's own files stay behind
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file()


def test_report(qdirs, tmp_path):
    qdir, records = qdirs("mixed")
    report = ct.export_compressed_tensors(qdir, tmp_path / "ct")
    assert report["format"] == "compressed-tensors/pack-quantized"
    assert report["container_bits"] is None and report["packing_layout"] == "dense"
    assert report["families"]["model.layers.*.self_attn.q_proj"] == {
        "bits": ["3"], "stored_bits": [3], "group_size": [32]}
    assert report["families"]["model.layers.*.mlp.up_proj"] == {
        "bits": ["2", "ternary"], "stored_bits": [2], "group_size": [32, 64]}
    assert report["ternary_modules"] == 3 and report["quantized_modules"] == len(records)
    assert any("ternary" in note for note in report["notes"])
    assert report["negative_scale_groups"] > 0  # RTN picks mirrored 2-/3-bit groups
    assert report["sizes"]["quantized_params"] == sum(q.codes.numel() for q in records.values())
    assert report["sizes"]["total_bytes"] > report["sizes"]["quantized_bytes"] > 0


def test_ternary_scales_made_positive_in_native_2bit(qdirs, tmp_path):
    qdir, records = qdirs("ternary")
    assert all(bool((qw.scale < 0).any()) for qw in records.values())
    report = ct.export_compressed_tensors(qdir, tmp_path / "ct")
    assert report["negative_scale_groups"] == 0 and report["ternary_modules"] == len(records)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["gsq_export"]["ternary_stored_as"] == "2-bit codes -1..1"


def test_negative_scales_survive_native_and_vanish_in_container(qdirs, tmp_path):
    qdir, records = qdirs("2bit")
    assert any(bool((qw.scale < 0).any()) for qw in records.values())
    native = ct.export_compressed_tensors(qdir, tmp_path / "native")
    boxed = ct.export_compressed_tensors(qdir, tmp_path / "boxed", container_bits=4)
    negative = sum(int((q.scale < 0).sum()) for q in records.values())
    assert native["negative_scale_groups"] == negative
    assert boxed["negative_scale_groups"] == 0
    scales = load_file(str(tmp_path / "boxed" / "model.safetensors"))
    assert all(bool((t >= 0).all()) for k, t in scales.items() if k.endswith("weight_scale"))


def test_bf16_checkpoint_is_exact_on_both_load_paths(qdirs, tmp_path):
    qdir, records = qdirs("2bit", torch.bfloat16)
    report = ct.export_compressed_tensors(qdir, tmp_path / "ct")
    assert report["scale_dtype"] == "bfloat16"
    for dequantize in (False, True):
        loaded = _load(tmp_path / "ct", dequantize)
        assert loaded.dtype == torch.bfloat16
        assert _mismatched(loaded, records) == []
    reference, _, _ = load_quantized(qdir, dtype=torch.bfloat16)
    torch.testing.assert_close(_logits(loaded), _logits(reference), rtol=1.6e-2, atol=1e-2)


def test_library_decompressor_reads_the_file(qdirs, tmp_path):
    """Reader side without transformers: PackedQuantizationCompressor.decompress gives s*c."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qdir, records = qdirs("mixed")
    ct.export_compressed_tensors(qdir, tmp_path / "ct", container_bits=None)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    schemes = QuantizationConfig.model_validate(config).config_groups.values()
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    for name, qw in records.items():
        scheme = next(s for s in schemes if name in s.targets)
        state = {k: tensors[f"{name}.{k}"]
                 for k in ("weight_packed", "weight_scale", "weight_shape")}
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        assert torch.equal(weight, qw.dequantize(weight.dtype)), name


def test_sharded_source(qdirs, tmp_path, tiny_llama, byte_tokenizer):
    _, records = qdirs("4bit")
    model = tiny_llama(0)
    apply_records(model, records)
    qdir = tmp_path / "q"
    save_quantized(qdir, model, byte_tokenizer, records, {}, {})
    (qdir / "model.safetensors").unlink()
    model.save_pretrained(qdir, max_shard_size="200KB")
    assert (qdir / ct.INDEX_FILE).is_file()

    ct.export_compressed_tensors(qdir, tmp_path / "ct")
    index = json.loads((tmp_path / "ct" / ct.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.0.mlp.up_proj.weight_packed" in index["weight_map"]
    assert "model.layers.0.mlp.up_proj.weight" not in index["weight_map"]
    assert _mismatched(_load(tmp_path / "ct"), records) == []


# ---------------------------------------------------------------------------------------------
# packing layout (formats.md A.3) against an independent reference


def reference_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Per row: element j at bits [j*b, j*b+b) of an LSB-first bit stream of u = c + 2**(b-1)."""
    rows, n = codes.shape
    words = -(-n * bits // 32)
    out = torch.zeros(rows, words, dtype=torch.int64)
    for r in range(rows):
        stream = sum((c + (1 << (bits - 1))) << (j * bits) for j, c in enumerate(codes[r].tolist()))
        out[r] = torch.tensor([(stream >> (32 * k)) & 0xFFFFFFFF for k in range(words)])
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def reference_padded(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors <= 0.17: floor(32/b) codes per word, the top bits left zero."""
    per = 32 // bits
    rows, n = codes.shape
    words = [[0] * -(-n // per) for _ in range(rows)]
    for r, row in enumerate(codes.tolist()):
        for j, c in enumerate(row):
            words[r][j // per] += (c + (1 << (bits - 1))) << (bits * (j % per))
    out = torch.tensor(words, dtype=torch.int64)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("width", [32, 64, 96, 128])
def test_packing_matches_spec_and_round_trips(bits, width):
    gen = torch.Generator().manual_seed(bits * 1000 + width)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, width), generator=gen,
                          dtype=torch.int8)
    codes[0, : min(width, 2**bits)] = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1))[:width]
    packed = ct.pack_codes(codes, bits)
    assert torch.equal(packed, reference_dense(codes, bits))
    _, _, unpack = ct._library()
    assert torch.equal(unpack(packed, bits, codes.shape), codes)


def test_reference_tells_the_3bit_layouts_apart():
    """Negative control: the layout test above would fail for a padded (<= 0.17) packer."""
    codes = (torch.arange(64, dtype=torch.int8) % 8 - 4).reshape(2, 32)
    assert ct.packing_layout() == "dense"
    assert reference_padded(codes, 3).shape != reference_dense(codes, 3).shape
    assert torch.equal(reference_padded(codes, 4), reference_dense(codes, 4))
    assert not torch.equal(reference_padded(codes[:, :30], 3), reference_dense(codes[:, :30], 3))


def test_padded_packer_refuses_native_3bit(qdirs, tmp_path, monkeypatch):
    _, _, unpack = ct._library()
    monkeypatch.setattr(ct, "_library", lambda: ("0.17.1", reference_padded, unpack))
    assert ct.packing_layout() == "padded"
    qdir, records = qdirs("3bit")
    with pytest.raises(GSQError, match="padded"):
        ct.export_compressed_tensors(qdir, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    # 4-bit codes pack identically in both layouts, so the container export goes through
    report = ct.export_compressed_tensors(qdir, tmp_path / "ct", container_bits=4)
    assert report["packing_layout"] == "padded" and report["compressed_tensors_version"] == "0.17.1"
    monkeypatch.undo()
    assert _mismatched(_load(tmp_path / "ct"), records) == []


def test_packer_that_does_not_round_trip_is_refused(qdirs, tmp_path, monkeypatch):
    version, pack, unpack = ct._library()
    monkeypatch.setattr(ct, "_library",
                        lambda: (version, pack, lambda p, b, s: unpack(p, b, s).flip(-1)))
    with pytest.raises(GSQError, match="round-trip"):
        ct.export_compressed_tensors(qdirs("2bit")[0], tmp_path / "ct")


def _repack(out, name, fn):
    """Rewrite the packed words of one module in the exported file with `fn(words)`."""
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    tensors[f"{name}.weight_packed"] = fn(tensors[f"{name}.weight_packed"]).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _swap_nibbles(words):
    b = words.view(torch.uint8)
    return ((b << 4) | (b >> 4)).view(torch.int32)


@pytest.mark.parametrize(("scenario", "wrong"), [
    ("4bit", _swap_nibbles),  # element order inside a byte reversed
    ("2bit", lambda w: w ^ (0xAAAAAAAA - 2**32)),  # two's-complement codes, no +2 offset
    ("3bit", lambda w: w.roll(1, dims=1)),  # words of a row out of order
])
def test_mispacked_file_is_caught(qdirs, tmp_path, scenario, wrong):
    """Negative control: the exactness check fails on a file whose layout is wrong."""
    qdir, records = qdirs(scenario)
    out = tmp_path / "ct"
    ct.export_compressed_tensors(qdir, out)
    name = "model.layers.1.mlp.down_proj"
    _repack(out, name, wrong)
    assert _mismatched(_load(out), records) == [name]


# ---------------------------------------------------------------------------------------------
# errors


def test_not_a_gsq_dir(tiny_llama_dir, tmp_path):
    with pytest.raises(GSQError, match="not a gsq quantized directory"):
        ct.export_compressed_tensors(tiny_llama_dir, tmp_path / "ct")
    with pytest.raises(GSQError, match="not a gsq quantized directory"):
        ct.export_compressed_tensors(tmp_path / "missing", tmp_path / "ct")


@pytest.mark.parametrize("bad", [2, 3, 16, 0, "4", 4.0, True])
def test_bad_container_bits(qdirs, tmp_path, bad):
    with pytest.raises(GSQError, match="container bits"):
        ct.export_compressed_tensors(qdirs("2bit")[0], tmp_path / "ct", container_bits=bad)
    assert not (tmp_path / "ct").exists()


def test_existing_output_needs_overwrite(qdirs, tmp_path):
    qdir, _ = qdirs("4bit")
    out = tmp_path / "ct"
    out.mkdir()
    with pytest.raises(GSQError, match="already exists"):
        ct.export_compressed_tensors(qdir, out)
    ct.export_compressed_tensors(qdir, out, overwrite=True)
    assert (out / "model.safetensors").is_file()
    assert not any(p.name.startswith(".ct.tmp-") for p in tmp_path.iterdir())


def test_scale_not_representable_in_fp16(tiny_llama, byte_tokenizer, tmp_path):
    model = tiny_llama(0).half()
    records = _quantize(model, _uniform(4, 32))
    ok = tmp_path / "ok"
    save_quantized(ok, model, byte_tokenizer, records, {}, {})
    assert ct.export_compressed_tensors(ok, tmp_path / "ct-ok")["scale_dtype"] == "float16"

    records["model.layers.0.mlp.up_proj"].scale[0, 0] = 2.0**-30  # bf16 yes, fp16 underflows
    bad = tmp_path / "bad"
    save_quantized(bad, model, byte_tokenizer, records, {}, {})
    with pytest.raises(GSQError, match="not representable in float16"):
        ct.export_compressed_tensors(bad, tmp_path / "ct-bad")
    assert not (tmp_path / "ct-bad").exists()
    assert not any(p.name.startswith(".ct-bad.tmp-") for p in tmp_path.iterdir())
