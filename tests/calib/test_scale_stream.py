"""The end-to-end scale stage streamed one block at a time (`gsq.calib.scale_stream`): the same
bits as the in-memory stage (kept scales, per-epoch KLs, the written directory), dense and MoE;
never worse on held-out KL than its input (a run that hurts leaves the directory as it was);
one block resident at a time; `gsq quantize --e2e-streamed on` reports it."""

from __future__ import annotations

import json

import pytest
import torch

from gsq.api import calibration_tokens, calibration_windows, load_any_model, quantize
from gsq.calib.scale_finetune import capture_teacher, kept_scale, scale_finetune
from gsq.calib.scale_stream import host_multipliers, scale_finetune_streamed
from gsq.config import E2EConfig, QuantizeConfig
from gsq.data.calibration import load_calibration_text
from gsq.models.quantized import load_quantized
from gsq.models.quantized_stream import QuantizedBlocks, open_quantized
from gsq.models.registry import adapter_for
from gsq.models.streaming import StreamedBlocks, open_model
from gsq.quant.trainer import TrainConfig

CPU = torch.device("cpu")


def _cfg(**e2e) -> QuantizeConfig:
    """RTN blocks; the stage with two micro-batches per step (their gradients are summed)."""
    stage = {**dict(epochs=2, lr=1e-2, batch_size=4, micro_batch_size=2, norms=True), **e2e}
    return QuantizeConfig(method="rtn", bits=2, group_size=32, nsamples=8, val_samples=4,
                          gptq_samples=4, seqlen=32, qk_steps=0,
                          train=TrainConfig(epochs=0, batch_size=4, micro_batch_size=4),
                          e2e=E2EConfig(**stage))


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(load_calibration_text("book")[:30_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, byte_tokenizer):
    from gsq.models.synthetic import build_random_model, random_config, save_random_model

    path = tmp_path_factory.mktemp("qwen3-moe")
    save_random_model(build_random_model(random_config("qwen3_moe", 256), seed=0),
                      byte_tokenizer, path)
    return path


def _blocks_only(model_dir, calib, out, cfg):
    """A streamed run without the stage: the directory the stage starts from, and the windows."""
    result = quantize(str(model_dir), cfg.replace(e2e=E2EConfig()), str(calib), out,
                      progress=False)
    return calibration_windows(calibration_tokens(result.tokenizer, str(calib)), cfg)


class _Resident(QuantizedBlocks):
    """Counts the blocks holding real tensors each time one is loaded."""

    most = 0

    def load(self, index, block, device):
        super().load(index, block, device)
        blocks = self.adapter.blocks(self.model)
        resident = sum(any(not p.is_meta for p in b.parameters()) for b in blocks)
        _Resident.most = max(_Resident.most, resident)


def test_streamed_stage_gives_the_in_memory_bits(tiny_llama_dir, calib, tmp_path):
    """Same seed and config, fp32 on the CPU: the streamed teacher equals the in-memory one, and
    the streamed student keeps bit-identical scales after bit-identical epochs; only one block
    holds real tensors at a time."""
    cfg = _cfg()
    windows = _blocks_only(tiny_llama_dir, calib, tmp_path / "q", cfg)
    adapter = adapter_for("llama")
    fp, _ = load_any_model(str(tiny_llama_dir))
    teacher = capture_teacher(fp, adapter, windows, cfg, CPU)
    model, _, records = load_quantized(tmp_path / "q")
    out, report = scale_finetune(model, adapter, records, windows, teacher, cfg, CPU)

    source = open_model(str(tiny_llama_dir))
    streamed_teacher = capture_teacher(source.model, adapter, windows, cfg, CPU,
                                       StreamedBlocks(source.model, adapter, source.source))
    assert torch.equal(streamed_teacher.train, teacher.train)
    assert torch.equal(streamed_teacher.val, teacher.val)
    plain = open_quantized(tmp_path / "q")
    loader = _Resident(open_model(str(tmp_path / "q")), adapter, plain.codes)
    specs = loader.codes.specs
    trainable = host_multipliers(loader.model, adapter, specs,
                                 {n: loader.codes.scale_shape(n) for n in specs}, True)
    streamed = scale_finetune_streamed(loader.model, adapter, loader, trainable, windows,
                                       streamed_teacher, cfg, CPU)

    assert report["best_epoch"] == streamed["best_epoch"] == 2
    assert [(h["train_kl"], h["val_kl"]) for h in streamed["history"]] == \
        [(h["train_kl"], h["val_kl"]) for h in report["history"]]
    assert streamed["val_kl_before"] == report["val_kl_before"]
    assert trainable.scales.keys() == out.keys() and len(trainable.norms) == 5
    for name, m in trainable.scales.items():
        assert torch.equal(kept_scale(records[name], m), out[name].scale), name
    fresh, _, _ = load_quantized(tmp_path / "q")
    for name, m in trainable.norms.items():  # the in-memory stage leaves w0 * m in the model
        w0 = fresh.get_submodule(name).weight
        assert torch.equal(w0 * m, model.get_submodule(name).weight), name
    assert _Resident.most == 1
    assert all(p.is_meta for p in loader.model.parameters())  # nothing left loaded


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_quantize_writes_the_same_model_streamed_or_not(tiny_llama_dir, moe_dir, calib,
                                                        tmp_path, arch):
    """`quantize(..., e2e_streamed=on|off)`: the same records and weights (the streamed one
    keeps the per-block shards); MoE expert scales are frozen (slices of fused parameters),
    the other linears' and the norms trained."""
    model_dir = tiny_llama_dir if arch == "llama" else moe_dir
    cfg = _cfg()
    loaded = {}
    for mode in ("off", "on"):
        result = quantize(str(model_dir), cfg, str(calib), tmp_path / mode, progress=False,
                          e2e_streamed=mode)
        assert result.report["e2e"]["streamed"] == (mode == "on")
        assert result.report["e2e"]["best_epoch"] > 0
        assert result.report["e2e"]["peak_host_rss_gib"] > 0
        loaded[mode] = (load_quantized(tmp_path / mode), result.report["e2e"])
    ((m_off, _, r_off), e_off), ((m_on, _, r_on), e_on) = loaded["off"], loaded["on"]
    assert e_on["history"] == [dict(h, seconds=g["seconds"])
                               for h, g in zip(e_off["history"], e_on["history"], strict=True)]
    assert e_on["frozen"] == e_off["frozen"]
    assert r_on.keys() == r_off.keys()
    for name in r_on:
        assert torch.equal(r_on[name].codes, r_off[name].codes)
        assert torch.equal(r_on[name].scale, r_off[name].scale), name
    state_on, state_off = m_on.state_dict(), m_off.state_dict()
    for key, value in state_off.items():
        assert torch.equal(state_on[key], value), key
    assert (tmp_path / "on" / "model.safetensors.index.json").is_file()
    if arch == "qwen3_moe":
        experts = set(adapter_for("qwen3_moe").expert_linears(m_on))
        assert experts and set(e_on["frozen"]) == experts
        assert e_on["trained_scales"] == len(r_on) - len(experts)


def test_a_run_that_hurts_leaves_the_directory_as_it_was(tiny_llama_dir, calib, tmp_path):
    """lr 0.5 wrecks every epoch: the streamed stage keeps its input, the held-out KL it reports
    is the input's, and only report.json changes (gaining `e2e`)."""
    cfg = _cfg(lr=0.5)
    windows = _blocks_only(tiny_llama_dir, calib, tmp_path / "q", cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()}
    from gsq.api import finetune_output

    report = finetune_output(tmp_path / "q", str(tiny_llama_dir), windows, cfg, CPU,
                             progress=False, streamed=True, spill=True)
    e2e = report["e2e"]
    assert e2e["streamed"] and e2e["best_epoch"] == 0
    assert all(h["val_kl"] > e2e["val_kl_before"] for h in e2e["history"])
    assert e2e["val_kl_after"] == e2e["val_kl_before"]
    after = {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()}
    assert after.keys() == before.keys()
    assert all(after[n] == before[n] for n in before if n != "report.json")
    assert json.loads(after["report.json"])["e2e"]["best_epoch"] == 0
    assert not any(".e2e-" in p.name or ".tmp-" in p.name for p in tmp_path.iterdir())


def test_cli_streams_the_stage_when_asked(tiny_llama_dir, calib, tmp_path):
    from gsq.cli.__main__ import main

    out = tmp_path / "q"
    argv = ["-q", "quantize", str(tiny_llama_dir), "--calib", str(calib), "--out", str(out),
            "--method", "rtn", "--group-size", "32", "--nsamples", "8", "--val-samples", "4",
            "--gptq-samples", "4", "--seqlen", "32", "--e2e-epochs", "1", "--e2e-streamed", "on"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["e2e"]["streamed"] is True
    assert report["plan"]["predicted"]["e2e_streamed"] is True


def test_an_interrupted_rewrite_leaves_the_block_loop_output(tiny_llama_dir, calib, tmp_path,
                                                             monkeypatch):
    """A kill while the trained directory is written: `--out` still holds the block loop's
    complete output, byte for byte (the new one is built beside it and renamed at the end)."""
    import gsq.io.quantized_dir as quantized_dir
    from gsq.api import finetune_output

    cfg = _cfg()
    windows = _blocks_only(tiny_llama_dir, calib, tmp_path / "q", cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()}
    write, calls = quantized_dir.write_safetensors, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write(*args, **kwargs)

    monkeypatch.setattr(quantized_dir, "write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune_output(tmp_path / "q", str(tiny_llama_dir), windows, cfg, CPU, progress=False,
                        streamed=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
