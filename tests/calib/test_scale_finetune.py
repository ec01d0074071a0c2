"""The end-to-end scale stage (`gsq.calib.scale_finetune`) on tiny random Llamas: never worse on
held-out KL than its input, gradients only to scales (and norms when asked), codes frozen, the
model equal to `scale * codes`, deterministic, scales storable (bf16 or a GGUF target's lattice)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gsq.api import quantize_model
from gsq.calib.capture import capture_block_context, capture_block_inputs
from gsq.calib.scale_finetune import (
    _micro_kl,
    _parametrize,
    _release,
    capture_teacher,
    scale_finetune,
)
from gsq.config import E2EConfig, QuantizeConfig
from gsq.models.registry import adapter_for
from gsq.quant.grids import to_bf16_grid
from gsq.quant.lattice import Fp16Lattice
from gsq.quant.trainer import TrainConfig

CPU = torch.device("cpu")
SEQLEN = 32


def _cfg(**changes) -> QuantizeConfig:
    base = QuantizeConfig(method="rtn", bits=2, group_size=32, nsamples=8, val_samples=4,
                          gptq_samples=4, seqlen=SEQLEN, qk_steps=0,
                          train=TrainConfig(epochs=0, batch_size=4, micro_batch_size=4),
                          e2e=E2EConfig(epochs=2, lr=1e-2, batch_size=2, micro_batch_size=2))
    return base.replace(**changes)


def _windows(random_windows, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_windows({"train": 8, "val": 4}, SEQLEN, seed=seed)


def _quantized(tiny_llama, cfg: QuantizeConfig, model_seed: int = 0, **overrides):
    """(fp model, rtn-quantized copy, records) without the e2e stage."""
    fp = tiny_llama(model_seed, **overrides)
    model = copy.deepcopy(fp)
    tokens = torch.randint(0, 256, (40 * SEQLEN,), generator=torch.Generator().manual_seed(1))
    records, _ = quantize_model(model, None, cfg.replace(e2e=E2EConfig()), tokens, CPU, False)
    return fp, model, records


def _stage(fp, model, records, windows, cfg):
    adapter = adapter_for(fp.config.model_type)
    teacher = capture_teacher(fp, adapter, windows, cfg, CPU)
    return scale_finetune(model, adapter, records, windows, teacher, cfg, CPU)


def _held_out_kl(model, fp, val: torch.Tensor) -> float:
    """KL(fp || model) per token over every position of the val windows, by plain HF forwards."""
    with torch.no_grad():
        log_q = F.log_softmax(model(input_ids=val).logits.float(), -1).flatten(0, 1)
        log_p = F.log_softmax(fp(input_ids=val).logits.float(), -1).flatten(0, 1)
    return float(F.kl_div(log_q, log_p, log_target=True, reduction="sum")) / log_q.shape[0]


def test_teacher_is_the_full_precision_model(tiny_llama, random_windows):
    fp = tiny_llama(0)
    windows = _windows(random_windows)
    teacher = capture_teacher(fp, adapter_for("llama"), windows, _cfg(), CPU)
    with torch.no_grad():
        expected = fp.model(input_ids=windows["val"]).last_hidden_state
    torch.testing.assert_close(teacher.val, expected, rtol=1e-5, atol=1e-5)
    assert teacher.train.shape == (8, SEQLEN, 64)
    fewer = _cfg(e2e=E2EConfig(epochs=1, windows=3))  # the first 3 train windows only
    few = capture_teacher(fp, adapter_for("llama"), windows, fewer, CPU)
    torch.testing.assert_close(few.train, teacher.train[:3], rtol=1e-5, atol=1e-5)


def test_training_lowers_held_out_kl_and_model_is_scale_times_codes(tiny_llama, random_windows):
    cfg = _cfg()
    fp, model, records = _quantized(tiny_llama, cfg)
    windows = _windows(random_windows)
    before = _held_out_kl(model, fp, windows["val"])
    out, report = _stage(fp, model, records, windows, cfg)
    assert report["val_kl_before"] == pytest.approx(before, rel=1e-4)
    assert report["best_epoch"] > 0 and report["val_kl_after"] < report["val_kl_before"]
    assert report["val_kl_after"] == pytest.approx(_held_out_kl(model, fp, windows["val"]),
                                                   rel=1e-4)
    changed = 0
    for name, qw in out.items():
        assert torch.equal(qw.codes, records[name].codes)  # codes frozen
        assert torch.equal(to_bf16_grid(qw.scale), qw.scale)  # storable as bf16
        weight = model.get_submodule(name).weight
        assert torch.equal(weight, qw.dequantize(weight.dtype)) and not weight.requires_grad
        changed += int(not torch.equal(qw.scale, records[name].scale))
    assert changed == len(out)
    assert not any(p.requires_grad for p in model.parameters())
    assert not hasattr(model.get_submodule(next(iter(out))), "parametrizations")


def test_a_run_that_hurts_is_reverted(tiny_llama, random_windows):
    """lr 0.5 (every step moves each scale by half its value) wrecks the model: the input
    scales, and the model, come back unchanged."""
    cfg = _cfg(e2e=E2EConfig(epochs=2, lr=0.5, batch_size=2, micro_batch_size=2, norms=True))
    fp, model, records = _quantized(tiny_llama, cfg)
    norms_before = {n: p.clone() for n, p in model.named_parameters() if "norm" in n}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out, report = _stage(fp, model, records, _windows(random_windows), cfg)
    assert all(h["val_kl"] > report["val_kl_before"] for h in report["history"])
    assert report["best_epoch"] == 0 and report["val_kl_after"] == report["val_kl_before"]
    for name, qw in out.items():
        assert torch.equal(qw.scale, records[name].scale)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert norms_before  # the norms were trained and restored too


@pytest.mark.parametrize("norms", [False, True])
def test_gradients_reach_only_the_multipliers(tiny_llama, random_windows, norms):
    """Scale gradients equal the chain rule through the plain weight's autograd gradient:
    dL/dm = s0 * sum over the group of codes * dL/dW (at m = 1)."""
    cfg = _cfg()
    fp, model, records = _quantized(tiny_llama, cfg)
    adapter, windows = adapter_for("llama"), _windows(random_windows)
    teacher = capture_teacher(fp, adapter, windows, cfg, CPU)
    ctx = capture_block_context(model, adapter, SEQLEN, CPU)
    x = capture_block_inputs(model, adapter, windows["train"][:2], CPU)

    plain = copy.deepcopy(model)
    for name in records:
        plain.get_submodule(name).weight.requires_grad_(True)
    _micro_kl(plain, adapter, x, teacher.train[:2], ctx).backward()

    trainable = _parametrize(model, adapter, records, norms, CPU)
    _micro_kl(model, adapter, x, teacher.train[:2], ctx).backward()
    grads = {id(p) for p in trainable.params()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in grads)
    assert len(trainable.norms) == (5 if norms else 0)  # 2 blocks x 2 + the final norm
    for name, m in trainable.scales.items():
        qw, g_w = records[name], plain.get_submodule(name).weight.grad
        expected = qw.scale * (g_w * qw.codes.float()).view(*qw.scale.shape, -1).sum(-1)
        torch.testing.assert_close(m.grad, expected, rtol=1e-4, atol=1e-10)
    assert all(p.grad.abs().sum() > 0 for p in trainable.norms.values())
    _release(model, records, trainable)


def test_deterministic_with_the_seed(tiny_llama, random_windows):
    cfg = _cfg()
    runs = []
    for _ in range(2):
        fp, model, records = _quantized(tiny_llama, cfg)
        runs.append(_stage(fp, model, records, _windows(random_windows), cfg))
    (a, ra), (b, rb) = runs
    assert ra["history"] == [dict(h, seconds=h2["seconds"])
                             for h, h2 in zip(rb["history"], ra["history"], strict=True)]
    for name in a:
        assert torch.equal(a[name].scale, b[name].scale)


def test_gguf_target_scales_stay_on_the_lattice(tiny_llama, random_windows):
    """Q2_K (K lattice carried by the records) and a Q4_0 fallback (fp16): trained scales are
    lattice points; a K record that lost its lattice is left alone and reported."""
    cfg = _cfg().targeting("Q2_K")
    fp, model, records = _quantized(tiny_llama, cfg, hidden_size=256, intermediate_size=320,
                                    num_hidden_layers=1)
    types = {qw.spec.target for qw in records.values()}
    assert types == {"Q2_K", "Q4_0"}
    lost = "model.layers.0.self_attn.q_proj"
    records[lost] = dataclasses.replace(records[lost], lattice=None)
    out, report = _stage(fp, model, records, _windows(random_windows), cfg)
    assert report["frozen"] == [lost] and torch.equal(out[lost].scale, records[lost].scale)
    assert report["best_epoch"] > 0
    for name, qw in out.items():
        if name == lost:
            continue
        lattice = qw.lattice if qw.spec.target == "Q2_K" else Fp16Lattice(qw.spec)
        assert torch.equal(lattice.project(qw.scale), qw.scale), name
        assert torch.equal(qw.codes, records[name].codes)
    assert any(not torch.equal(out[n].scale, records[n].scale) for n in out if n != lost)


def test_streamed_quantize_runs_the_stage_on_its_output(tiny_llama_dir, tmp_path):
    """`gsq.quantize` (streamed) then the stage on the finished directory: same codes as without
    the stage, trained scales saved, the saved model's held-out KL the one the report gives."""
    from gsq.api import calibration_tokens, calibration_windows, load_any_model, quantize
    from gsq.data.calibration import load_calibration_text
    from gsq.models.quantized import load_quantized

    calib = tmp_path / "calib.txt"
    calib.write_text(load_calibration_text("book")[:30_000], encoding="utf-8")
    cfg = _cfg()
    plain = quantize(str(tiny_llama_dir), cfg.replace(e2e=E2EConfig()), str(calib),
                     tmp_path / "plain", progress=False)
    tuned = quantize(str(tiny_llama_dir), cfg, str(calib), tmp_path / "e2e", progress=False)
    assert "e2e" not in plain.report
    report = tuned.report["e2e"]
    assert report["best_epoch"] > 0 and report["val_kl_after"] < report["val_kl_before"]
    model, tokenizer, records = load_quantized(tmp_path / "e2e")
    assert records.keys() == plain.records.keys()
    for name, qw in records.items():
        assert torch.equal(qw.codes, plain.records[name].codes)
        assert not torch.equal(qw.scale, plain.records[name].scale)
    fp, _ = load_any_model(str(tiny_llama_dir))
    val = calibration_windows(calibration_tokens(tokenizer, str(calib)), cfg)["val"]
    assert _held_out_kl(model, fp, val) == pytest.approx(report["val_kl_after"], rel=1e-4)
    assert _held_out_kl(plain.model, fp, val) == pytest.approx(report["val_kl_before"], rel=1e-4)
