"""Streamed runs through the partial directory: an interrupted run resumed with `resume=True`
writes the same bytes as an uninterrupted one; a changed config or input is refused; nothing
appears at `out` before the end; a user error removes the partial directory."""

from __future__ import annotations

import json
import random

import pytest
import torch

import gsq.calib.sequential as sequential
from gsq.api import quantize
from gsq.config import cpu_preset
from gsq.errors import GSQError
from gsq.io.partial import partial_path
from gsq.quant.trainer import TrainConfig

WORDS = ("the", "of", "and", "to", "in", "is", "was", "that", "for", "on", "with", "as", "by")


def _cfg(**changes):
    base = dict(method="gsq", group_size=32, nsamples=4, val_samples=2, gptq_samples=4, seqlen=16,
                qk_steps=2, train=TrainConfig(epochs=1, batch_size=2, micro_batch_size=2))
    return cpu_preset(**{**base, **changes})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama, byte_tokenizer):
    path = tmp_path_factory.mktemp("model")
    tiny_llama(5, num_hidden_layers=3).to(torch.bfloat16).save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(600)))
    return path


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name.endswith(".safetensors") or p.name.endswith(".index.json")}


def _interrupt_at(monkeypatch, block: int):
    real = sequential.quantize_block

    def fake(blk, index, *args, **kwargs):
        if index == block:
            raise KeyboardInterrupt
        return real(blk, index, *args, **kwargs)

    monkeypatch.setattr(sequential, "quantize_block", fake)


def test_interrupted_run_resumes_to_the_same_bytes(model_dir, calib, tmp_path, monkeypatch):
    reference = tmp_path / "ref"
    quantize(str(model_dir), _cfg(), calib=str(calib), out=reference, progress=False)
    out = tmp_path / "q"
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        quantize(str(model_dir), _cfg(), calib=str(calib), out=out, progress=False)
    monkeypatch.undo()
    assert not out.exists()
    state = json.loads((partial_path(out) / "run.json").read_text())
    assert state["done"] == 2 and len(state["blocks"]) == 2
    with pytest.raises(GSQError, match="--resume"):
        quantize(str(model_dir), _cfg(), calib=str(calib), out=out, progress=False)
    result = quantize(str(model_dir), _cfg(), calib=str(calib), out=out, progress=False,
                      resume=True)
    assert result.report["resumed_from_block"] == 2
    assert [b["block"] for b in result.report["blocks"]] == [0, 1, 2]
    assert not partial_path(out).exists()
    assert _files(out) == _files(reference)
    assert len(_files(out)) == 6  # 4 shards, the index, the codes


@pytest.mark.parametrize("change, reason", [
    (dict(nsamples=6), "the run config differs (config.nsamples: 4 -> 6)"),
    (dict(seed=1), "the run config differs (config.seed: 0 -> 1)"),
])
def test_resume_with_another_config_is_refused(model_dir, calib, tmp_path, monkeypatch, change,
                                               reason):
    out = tmp_path / "q"
    _interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        quantize(str(model_dir), _cfg(), calib=str(calib), out=out, progress=False)
    monkeypatch.undo()
    with pytest.raises(GSQError) as err:
        quantize(str(model_dir), _cfg(**change), calib=str(calib), out=out, progress=False,
                 resume=True)
    assert reason in str(err.value) and "\n" not in str(err.value)
    assert partial_path(out).is_dir()  # kept: the right command can still resume it


def test_resume_with_other_calibration_text_is_refused(model_dir, calib, tmp_path, monkeypatch):
    out = tmp_path / "q"
    _interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        quantize(str(model_dir), _cfg(), calib=str(calib), out=out, progress=False)
    monkeypatch.undo()
    other = tmp_path / "other.txt"
    other.write_text(calib.read_text()[::-1])
    with pytest.raises(GSQError, match="the calibration data differs"):
        quantize(str(model_dir), _cfg(), calib=str(other), out=out, progress=False, resume=True)


def test_overwrite_discards_a_partial_run(model_dir, calib, tmp_path, monkeypatch):
    out = tmp_path / "q"
    _interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        quantize(str(model_dir), _cfg(), calib=str(calib), out=out, progress=False)
    monkeypatch.undo()
    result = quantize(str(model_dir), _cfg(method="rtn"), calib=str(calib), out=out,
                      progress=False, overwrite=True)
    assert result.report["resumed_from_block"] == 0 and out.is_dir()


def test_user_error_mid_run_removes_the_partial_directory(model_dir, calib, tmp_path,
                                                          monkeypatch):
    def fail(*args, **kwargs):
        raise GSQError("block 0: quantized block output is not finite")

    monkeypatch.setattr(sequential, "quantize_block", fail)
    out = tmp_path / "q"
    with pytest.raises(GSQError, match="not finite"):
        quantize(str(model_dir), _cfg(), calib=str(calib), out=out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_activations_over_the_host_budget_spill_to_disk_with_the_same_result(model_dir, calib,
                                                                             tmp_path,
                                                                             monkeypatch):
    from gsq.calib.cache import ActivationStore

    in_ram = quantize(str(model_dir), _cfg(), calib=str(calib), out=tmp_path / "ram",
                      progress=False)
    assert in_ram.report["activations"] == "memory"
    spilled = []
    real = ActivationStore.empty

    def empty(self, shape, dtype=torch.float32):
        tensor = real(self, shape, dtype)
        spilled.append(self.on_disk)
        return tensor

    monkeypatch.setattr(ActivationStore, "empty", empty)
    on_disk = quantize(str(model_dir), _cfg(), calib=str(calib), out=tmp_path / "disk",
                       progress=False, max_host_memory=0.01)
    assert on_disk.report["activations"] == "disk"
    assert on_disk.report["plan"]["predicted"]["activations_spilled"]
    assert spilled and all(spilled)
    assert _files(tmp_path / "disk") == _files(tmp_path / "ram")


def test_report_has_the_plan_beside_the_measurements(model_dir, calib, tmp_path):
    report = quantize(str(model_dir), _cfg(method="rtn"), calib=str(calib), out=tmp_path / "q",
                      progress=False).report
    predicted, measured = report["plan"]["predicted"], report["plan"]["measured"]
    assert measured["peak_host_gib"] == report["peak_host_rss_gib"]
    assert measured["seconds_per_block"] == pytest.approx(
        sum(b["seconds"] for b in report["blocks"]) / 3)
    for key in ("peak_host_gib", "seconds_per_block", "disk_output_gib"):
        assert predicted[key] > 0 and measured[key] > 0, key
    written = sum(p.stat().st_size for p in (tmp_path / "q").glob("*.safetensors"))
    assert measured["disk_output_gib"] * 2**30 == pytest.approx(written, rel=0.01)


def test_interrupted_moe_run_resumes_to_the_same_bytes(arch_model_dir, calib, tmp_path,
                                                       monkeypatch):
    """Qwen3-MoE (block 0 dense, blocks 1-2 routed): the per-expert records, shards and the
    experts' token counts in the report come out the same after an interruption and resume."""
    model_dir = arch_model_dir("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[0])
    reference = quantize(str(model_dir), _cfg(), calib=str(calib), out=tmp_path / "ref",
                         progress=False)
    out = tmp_path / "q"
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        quantize(str(model_dir), _cfg(), calib=str(calib), out=out, progress=False)
    monkeypatch.undo()
    result = quantize(str(model_dir), _cfg(), calib=str(calib), out=out, progress=False,
                      resume=True)
    assert result.report["resumed_from_block"] == 2
    assert result.report["moe"] == reference.report["moe"]
    assert result.report["moe"]["experts"] == 2 * 4
    assert _files(out) == _files(tmp_path / "ref")
    from safetensors import safe_open

    with safe_open(str(out / "gsq_codes.safetensors"), "pt") as codes:
        assert "model.layers.2.mlp.experts.3.down_proj.codes" in set(codes.keys())


def _killed(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def e2e_reference(model_dir, calib, tmp_path_factory):
    """An uninterrupted run with the end-to-end stage (the cpu preset's)."""
    out = tmp_path_factory.mktemp("e2e") / "ref"
    quantize(str(model_dir), _cfg(), calib=str(calib), out=out, progress=False)
    return out


def _kill_at(owner, name: str, model_dir, calib, out, monkeypatch) -> None:
    """A run killed (KeyboardInterrupt) when `owner.name` is called: nothing at OUT."""
    monkeypatch.setattr(owner, name, _killed)
    with pytest.raises(KeyboardInterrupt):
        quantize(str(model_dir), _cfg(), calib=str(calib), out=out, progress=False)
    monkeypatch.undo()
    assert not out.exists()


def test_run_killed_in_the_e2e_stage_resumes_only_the_stage(model_dir, calib, tmp_path,
                                                             monkeypatch, e2e_reference):
    """A kill in the end-to-end stage leaves nothing at OUT and the completed block loop in
    OUT.partial; --resume runs only the stage (the block loop is not entered) and writes the
    bytes of an uninterrupted run."""
    import gsq.api as api

    assert _cfg().e2e.epochs > 0
    out = tmp_path / "q"
    _kill_at(api, "finetune_output", model_dir, calib, out, monkeypatch)
    assert json.loads((partial_path(out) / "run.json").read_text())["completed"] is True
    monkeypatch.setattr(sequential, "quantize_block", _killed)  # the block loop must not run
    result = quantize(str(model_dir), _cfg(), calib=str(calib), out=out, progress=False,
                      resume=True)
    assert "e2e" in result.report and not partial_path(out).exists()
    assert _files(out) == _files(e2e_reference)


def test_run_killed_after_the_e2e_stage_does_not_run_it_again(model_dir, calib, tmp_path,
                                                              monkeypatch, e2e_reference):
    """Killed between the stage's rewrite and the rename to OUT: --resume publishes the
    directory as it is (the stage is not run twice)."""
    import gsq.api as api
    from gsq.io.partial import PartialRun

    out = tmp_path / "q"
    _kill_at(PartialRun, "publish", model_dir, calib, out, monkeypatch)
    monkeypatch.setattr(api, "finetune_output", _killed)
    result = quantize(str(model_dir), _cfg(), calib=str(calib), out=out, progress=False,
                      resume=True)
    assert "e2e" in result.report
    assert _files(out) == _files(e2e_reference)
