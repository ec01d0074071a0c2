"""The quantized-model directory: exact round trips and atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from gsq.calib.sequential import run_quantization
from gsq.config import QuantizeConfig
from gsq.errors import GSQError
from gsq.io.quantized_dir import (
    CODES_FILE,
    META_FILE,
    REPORT_FILE,
    atomic_output_dir,
    check_output_path,
    is_quantized_dir,
    load_records,
    save_quantized,
)
from gsq.models.quantized import apply_records, load_quantized
from gsq.models.registry import adapter_for
from gsq.quant.trainer import TrainConfig


@pytest.fixture(scope="module")
def quantized(tiny_llama, random_windows):
    """A tiny Llama quantized at mixed bit-widths (2-bit; 3-bit attention; ternary block-1 MLP)."""
    cfg = QuantizeConfig(method="gsq", bits=2, group_size=32, nsamples=8, val_samples=2,
                         gptq_samples=4, seqlen=16, qk_steps=4,
                         bits_overrides=(("*.self_attn.*", 3), ("model.layers.1.mlp.*", "ternary")),
                         train=TrainConfig(epochs=1, batch_size=8, micro_batch_size=4,
                                           keep_best=False))
    model = tiny_llama(0)
    windows = random_windows({"train": 8, "val": 2, "gptq": 4}, 16, seed=0)
    records, report = run_quantization(model, adapter_for("llama"), windows, cfg,
                                       torch.device("cpu"), progress=False)
    return model, records, report, cfg


def _no_leftovers(parent, name):
    return not any(p.name.startswith(f".{name}.tmp-") for p in parent.iterdir())


def test_save_load_round_trip_is_exact(quantized, byte_tokenizer, tiny_llama, tmp_path):
    model, records, report, cfg = quantized
    out = tmp_path / "q"
    assert save_quantized(out, model, byte_tokenizer, records, cfg.to_dict(), report) == out
    assert is_quantized_dir(out)
    for f in (CODES_FILE, META_FILE, REPORT_FILE, "config.json"):
        assert (out / f).is_file()
    assert _no_leftovers(tmp_path, "q")

    loaded = load_records(out)
    assert set(loaded) == set(records)
    for name, qw in records.items():
        assert torch.equal(loaded[name].codes, qw.codes), name
        assert torch.equal(loaded[name].scale, qw.scale), name  # bf16 storage is exact
        assert loaded[name].spec == qw.spec
    specs = {qw.spec.bits for qw in loaded.values()}
    assert specs == {2, 3, "ternary"}

    fresh = tiny_llama(0)
    apply_records(fresh, loaded)
    for name in records:
        assert torch.equal(fresh.get_submodule(name).weight, model.get_submodule(name).weight)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values(), strict=True))

    meta = json.loads((out / META_FILE).read_text())
    assert meta["format"] == "gsq-quantized" and meta["config"]["method"] == "gsq"
    assert json.loads((out / REPORT_FILE).read_text())["blocks_total"] == 2


def test_load_quantized_rebuilds_model(quantized, byte_tokenizer, tmp_path):
    model, records, report, cfg = quantized
    out = tmp_path / "q"
    save_quantized(out, model, byte_tokenizer, records, cfg.to_dict(), report)
    loaded, tokenizer, recs = load_quantized(out)
    for name in records:
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight)
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == \
        byte_tokenizer("ab", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


class _FailingTokenizer:
    def save_pretrained(self, path):
        (path / "partial.json").write_text("{}")
        raise RuntimeError("disk full")


def test_failing_save_leaves_nothing_at_the_target(quantized, tmp_path):
    model, records, report, cfg = quantized
    out = tmp_path / "q"
    with pytest.raises(RuntimeError, match="disk full"):
        save_quantized(out, model, _FailingTokenizer(), records, cfg.to_dict(), report)
    assert not out.exists()
    assert _no_leftovers(tmp_path, "q")
    assert list(tmp_path.iterdir()) == []


def test_failing_overwrite_keeps_the_old_directory(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyError), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyError("interrupted")
    assert (out / "old.txt").read_text() == "old" and not (out / "new.txt").exists()
    assert _no_leftovers(tmp_path, "q")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_existing_output_needs_overwrite(quantized, byte_tokenizer, tmp_path):
    model, records, report, cfg = quantized
    out = tmp_path / "q"
    out.mkdir()
    with pytest.raises(GSQError, match="already exists"):
        save_quantized(out, model, byte_tokenizer, records, cfg.to_dict(), report)
    assert list(out.iterdir()) == []
    save_quantized(out, model, byte_tokenizer, records, cfg.to_dict(), report, overwrite=True)
    assert is_quantized_dir(out)


def test_check_output_path_errors(tmp_path):
    with pytest.raises(GSQError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "out")
    (tmp_path / "f").write_text("x")
    with pytest.raises(GSQError, match="already exists"):
        check_output_path(tmp_path / "f")
    assert check_output_path(tmp_path / "new") == tmp_path / "new"


def test_load_records_errors(tmp_path):
    with pytest.raises(GSQError, match="cannot read"):
        load_records(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"format": "other", "format_version": 1,
                                                  "modules": {}}))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / CODES_FILE))
    with pytest.raises(GSQError, match="not a gsq quantized directory"):
        load_records(tmp_path)


def test_apply_records_shape_mismatch(quantized, tiny_llama):
    _, records, _, _ = quantized
    other = tiny_llama(0, intermediate_size=96)
    with pytest.raises(GSQError, match="shape mismatch"):
        apply_records(other, records)
