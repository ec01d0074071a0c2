"""The block loop on a tiny random Llama (method §3.1, §11): stages, records, seeds, scope,
skips."""

from __future__ import annotations

import pytest
import torch

from gsq.calib import sequential as seq_mod
from gsq.calib.hooks import collect_hessians
from gsq.calib.sequential import run_quantization
from gsq.config import QuantizeConfig
from gsq.errors import GSQError
from gsq.models.registry import adapter_for
from gsq.quant.trainer import TrainConfig

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ALL_NAMES = {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
MLP_NAMES = {n for n in ALL_NAMES if ".mlp." in n}
SEQLEN = 32
COUNTS = {"train": 16, "val": 4, "gptq": 8}
CPU = torch.device("cpu")
NO_KEEP_BEST = TrainConfig(epochs=2, batch_size=8, micro_batch_size=4, keep_best=False)


def _cfg(method="gsq", **changes):
    base = QuantizeConfig(method=method, bits=2, group_size=32, nsamples=16, val_samples=4,
                          gptq_samples=8, seqlen=SEQLEN, qk_steps=20,
                          train=TrainConfig(epochs=2, batch_size=8, micro_batch_size=4))
    return base.replace(**changes)


@pytest.fixture(scope="module")
def windows(random_windows):
    return random_windows(COUNTS, SEQLEN, seed=0)


@pytest.fixture(scope="module")
def run(tiny_llama, windows):
    """run(cfg) -> (model, records, report, original state dict); cached per config."""
    cache = {}

    def _run(cfg: QuantizeConfig, wins=None):
        key = (repr(cfg), id(wins))
        if key not in cache:
            model = tiny_llama(0)
            original = {k: v.clone() for k, v in model.state_dict().items()}
            records, report = run_quantization(model, adapter_for("llama"), wins or windows, cfg,
                                               CPU, progress=False)
            cache[key] = (model, records, report, original)
        return cache[key]

    return _run


def _weight(model, name):
    return model.get_submodule(name).weight


def _check_records(records, names, bits=2):
    assert set(records) == names
    for qw in records.values():
        spec = qw.spec
        assert spec.bits == bits and spec.group_size == 32
        assert qw.codes.dtype == torch.int8 and qw.codes.device.type == "cpu"
        assert int(qw.codes.min()) >= spec.qmin and int(qw.codes.max()) <= spec.qmax
        out, cols = qw.codes.shape
        assert qw.scale.shape == (out, cols // 32)
        assert torch.isfinite(qw.scale).all() and (qw.scale != 0).all()


@pytest.mark.parametrize("method", ["rtn", "gptq", "gsq"])
def test_records_cover_every_linear_and_model_holds_them(run, method):
    model, records, report, original = run(_cfg(method))
    _check_records(records, ALL_NAMES)
    for name, qw in records.items():
        assert _weight(model, name).shape == qw.shape
        assert torch.equal(_weight(model, name), qw.dequantize(_weight(model, name).dtype))
        assert not torch.equal(_weight(model, name), original[name + ".weight"])
    # everything else is untouched: embeddings, norms, lm_head
    state = model.state_dict()
    for key, value in original.items():
        if key.removesuffix(".weight") not in records:
            assert torch.equal(state[key], value), key
    assert report["blocks_quantized"] == report["blocks_total"] == 2
    assert [b["block"] for b in report["blocks"]] == [0, 1]
    for block in report["blocks"]:
        assert [s["stage"] for s in block["stages"]] == ["qk", "vo", "mlp"]
        assert 0 < block["val_block_rel_mse"] < 1


def test_gptq_uses_hessians_and_beats_rtn(run):
    _, rtn, rtn_report, _ = run(_cfg("rtn"))
    _, gptq, gptq_report, _ = run(_cfg("gptq"))
    assert any(not torch.equal(rtn[n].codes, gptq[n].codes) for n in ALL_NAMES)
    for b_rtn, b_gptq in zip(rtn_report["blocks"], gptq_report["blocks"], strict=True):
        assert b_gptq["val_block_mse"] < b_rtn["val_block_mse"]


def test_gsq_report_keeps_best(run):
    _, records, report, _ = run(_cfg("gsq"))
    for block in report["blocks"]:
        for stage in block["stages"]:
            assert len(stage["val_loss_final"]) == len(stage["val_loss_init"]) >= 1
            for init, final in zip(stage["val_loss_init"], stage["val_loss_final"], strict=True):
                assert final <= init
            for kept, epoch in zip(stage["kept_init"], stage["best_epoch"], strict=True):
                assert kept == (epoch == 0)
        qk, vo, mlp = block["stages"]
        assert qk["linears"] == ["self_attn.q_proj", "self_attn.k_proj"]
        assert qk["steps"] == [20, 20]  # qk_steps full-batch steps per linear
        assert vo["steps"] == mlp["steps"] == [2 * (16 // 8)]  # epochs x steps per epoch
        assert len(mlp["history"][0]) == 2


def test_gsq_training_changes_codes_without_keep_best(run):
    _, gptq, _, _ = run(_cfg("gptq"))
    cfg = _cfg("gsq", train=NO_KEEP_BEST)
    _, gsq, report, _ = run(cfg)
    changed = [n for n in ALL_NAMES if not torch.equal(gsq[n].codes, gptq[n].codes)]
    assert len(changed) == len(ALL_NAMES)
    for block in report["blocks"]:
        for stage in block["stages"]:
            assert all(e > 0 for e in stage["best_epoch"])


def test_gsq_beats_gptq_on_block_output_at_a_modest_budget(run, random_windows):
    """At 6 epochs x 4 steps (plus 100 Q/K steps) GSQ lowers every block's held-out output error."""
    wins = random_windows({"train": 32, "val": 4, "gptq": 8}, SEQLEN, seed=1)
    budget = dict(nsamples=32, qk_steps=100,
                  train=TrainConfig(epochs=6, batch_size=8, micro_batch_size=4))
    _, _, gptq_report, _ = run(_cfg("gptq", **budget), wins)
    _, _, gsq_report, _ = run(_cfg("gsq", **budget), wins)
    for b_gptq, b_gsq in zip(gptq_report["blocks"], gsq_report["blocks"], strict=True):
        assert b_gsq["val_block_mse"] < b_gptq["val_block_mse"]


def test_same_seed_gives_identical_codes(run, tiny_llama, windows):
    _, first, _, _ = run(_cfg("gsq", train=NO_KEEP_BEST))
    model = tiny_llama(0)
    cfg = _cfg("gsq", train=NO_KEEP_BEST)
    second, _ = run_quantization(model, adapter_for("llama"), windows, cfg, CPU, progress=False)
    for name in ALL_NAMES:
        assert torch.equal(first[name].codes, second[name].codes), name
        assert torch.equal(first[name].scale, second[name].scale), name


def test_other_seed_gives_other_codes(run):
    train = TrainConfig(epochs=2, batch_size=8, micro_batch_size=4, keep_best=False)
    _, a, _, _ = run(_cfg("gsq", train=train))
    _, b, _, _ = run(_cfg("gsq", train=train, seed=1))
    assert any(not torch.equal(a[n].codes, b[n].codes) for n in ALL_NAMES)


def test_mlp_only_scope(run):
    model, records, report, original = run(_cfg("gsq", scope="mlp-only"))
    _check_records(records, MLP_NAMES)
    for i in range(2):
        for n in LINEARS[:4]:
            key = f"model.layers.{i}.{n}.weight"
            assert torch.equal(model.state_dict()[key], original[key])
        assert [s["stage"] for s in report["blocks"][i]["stages"]] == ["mlp"]


def test_skip_patterns_and_bits_overrides(run):
    cfg = _cfg("gptq", skip=("*.mlp.down_proj", "model.layers.1.self_attn.q_proj"),
               bits_overrides=(("*.self_attn.*", 4), ("model.layers.1.mlp.*", "ternary")))
    model, records, _, original = run(cfg)
    skipped = {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
               "model.layers.1.self_attn.q_proj"}
    assert set(records) == ALL_NAMES - skipped
    for name in skipped:
        assert torch.equal(_weight(model, name), original[name + ".weight"])
    for name, qw in records.items():
        expected = 4 if ".self_attn." in name else "ternary" if ".layers.1.mlp." in name else 2
        assert qw.spec.bits == expected, name
        assert int(qw.codes.min()) >= qw.spec.qmin and int(qw.codes.max()) <= qw.spec.qmax
    assert any(int(records[n].codes.max()) > 1 for n in records if ".self_attn." in n)  # 4-bit


def test_a_fully_skipped_stage_is_reported_as_skipped(run):
    _, records, report, _ = run(_cfg("gsq", skip=("*.self_attn.q_proj", "*.self_attn.k_proj")))
    assert not any("q_proj" in n or "k_proj" in n for n in records)
    for block in report["blocks"]:
        assert block["stages"][0] == {"stage": "qk", "linears": [], "skipped": True}


def test_max_blocks(run):
    model, records, report, original = run(_cfg("gsq", max_blocks=1))
    assert set(records) == {n for n in ALL_NAMES if ".layers.0." in n}
    assert report["blocks_quantized"] == 1 and report["blocks_total"] == 2
    for n in LINEARS:
        key = f"model.layers.1.{n}.weight"
        assert torch.equal(model.state_dict()[key], original[key])


@pytest.mark.parametrize("overrides, group_size, culprit", [
    ({}, 48, "model.layers.0.self_attn.q_proj"),  # 64 % 48
    ({"intermediate_size": 96}, 64, "model.layers.0.mlp.down_proj"),  # 96 % 64
])
def test_group_size_not_dividing_a_width_raises(tiny_llama, windows, overrides, group_size,
                                                 culprit):
    model = tiny_llama(0, **overrides)
    cfg = _cfg("gptq", group_size=group_size)
    with pytest.raises(GSQError, match=f"group size {group_size} does not divide.*{culprit}"):
        run_quantization(model, adapter_for("llama"), windows, cfg, CPU, progress=False)


def test_no_hooks_left_after_run(run):
    model, _, _, _ = run(_cfg("gsq"))
    for module in model.modules():
        assert not module._forward_pre_hooks, type(module).__name__
        assert not module._forward_hooks, type(module).__name__


def test_collect_hessians_removes_hooks_even_on_error(tiny_llama):
    block = tiny_llama(0).model.layers[0]
    names = ["mlp.up_proj", "mlp.down_proj"]
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    with collect_hessians(block, names) as accs:
        assert all(block.get_submodule(n)._forward_pre_hooks for n in names)
        h_mid = block.post_attention_layernorm(x)
        block.mlp(h_mid)
    assert not any(block.get_submodule(n)._forward_pre_hooks for n in names)
    xf = h_mid.reshape(-1, 64)
    torch.testing.assert_close(accs["mlp.up_proj"].H, 2 / 15 * xf.T @ xf, rtol=1e-5, atol=1e-6)
    assert accs["mlp.down_proj"].H.shape == (128, 128) and accs["mlp.down_proj"].n_samples == 15

    with pytest.raises(RuntimeError, match="boom"), collect_hessians(block, names):
        raise RuntimeError("boom")
    assert not any(block.get_submodule(n)._forward_pre_hooks for n in names)


@pytest.fixture
def gptq_hessians(monkeypatch) -> list:
    """Records the Hessian of every gptq_quantize call made by the block loop, in call order."""
    seen = []
    real = seq_mod.gptq_quantize

    def spy(W, H, spec, *args, **kwargs):
        seen.append(H.clone())
        return real(W, H, spec, *args, **kwargs)

    monkeypatch.setattr(seq_mod, "gptq_quantize", spy)
    return seen


def test_block_one_hessians_come_from_the_quantized_prefix(tiny_llama, windows, gptq_hessians):
    """Propagation: block 1's GPTQ Hessians are those of inputs through the *quantized* block 0."""
    seen = gptq_hessians
    model = tiny_llama(0)
    fp_model = tiny_llama(0)
    run_quantization(model, adapter_for("llama"), windows, _cfg("gptq"), CPU, progress=False)
    H_block1_q = seen[7]  # order: block 0 q, k, v, o, gate, up, down; block 1 q, ...

    def q_proj_hessian(m):
        with collect_hessians(m.model.layers[1], ["self_attn.q_proj"]) as accs, torch.no_grad():
            m(input_ids=windows["gptq"], use_cache=False)
        return accs["self_attn.q_proj"].H

    H_quant, H_fp = q_proj_hessian(model), q_proj_hessian(fp_model)
    torch.testing.assert_close(H_block1_q, H_quant, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(H_block1_q, H_fp, rtol=1e-3, atol=1e-4)


def test_rtn_init_for_gsq_is_honoured_mlp_only(run):
    _, rtn, _, _ = run(_cfg("rtn", scope="mlp-only"))
    _, gsq_rtn, report, _ = run(_cfg("gsq", init="rtn", scope="mlp-only"))
    _, gptq, _, _ = run(_cfg("gptq", scope="mlp-only"))
    _check_records(gsq_rtn, MLP_NAMES)
    for block in report["blocks"]:
        (stage,) = block["stages"]
        if stage["kept_init"] == [True]:  # kept-init stages return exactly the RTN codes
            for name in stage["linears"]:
                full = f"model.layers.{block['block']}.{name}"
                assert torch.equal(gsq_rtn[full].codes, rtn[full].codes)
                assert not torch.equal(gsq_rtn[full].codes, gptq[full].codes)


def test_rtn_init_for_gsq_all_linears(run):
    _, records, _, _ = run(_cfg("gsq", init="rtn"))
    _check_records(records, ALL_NAMES)


@pytest.mark.parametrize("qk_steps", [7, 10, 30])
def test_qk_stage_runs_qk_steps(run, qk_steps):
    _, _, report, _ = run(_cfg("gsq", qk_steps=qk_steps, max_blocks=1))
    assert report["blocks"][0]["stages"][0]["steps"] == [qk_steps, qk_steps]


@pytest.mark.parametrize("qk_steps", [15, 25])
def test_qk_stage_runs_qk_steps_not_a_multiple_of_ten(run, qk_steps):
    _, _, report, _ = run(_cfg("gsq", qk_steps=qk_steps, max_blocks=1))
    assert report["blocks"][0]["stages"][0]["steps"] == [qk_steps, qk_steps]


def test_qk_steps_zero_keeps_the_gptq_codes(run):
    _, gptq, _, _ = run(_cfg("gptq", max_blocks=1))
    _, gsq, report, _ = run(_cfg("gsq", qk_steps=0, max_blocks=1))
    qk = report["blocks"][0]["stages"][0]
    assert qk["steps"] == [0, 0] and qk["kept_init"] == [True, True]
    for name in ("self_attn.q_proj", "self_attn.k_proj"):
        full = "model.layers.0." + name
        assert torch.equal(gsq[full].codes, gptq[full].codes)


def test_all_zero_attention_weight_is_quantized(tiny_llama, windows):
    model = tiny_llama(0)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.zero_()
    records, _ = run_quantization(model, adapter_for("llama"), windows, _cfg("gsq", max_blocks=1),
                                  CPU, progress=False)
    assert (records["model.layers.0.self_attn.q_proj"].codes == 0).all()


def test_all_zero_mlp_weight_is_quantized(tiny_llama, windows):
    model = tiny_llama(0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()
    records, _ = run_quantization(model, adapter_for("llama"), windows,
                                  _cfg("gsq", max_blocks=1, scope="mlp-only"), CPU, progress=False)
    qw = records["model.layers.0.mlp.up_proj"]
    assert torch.isfinite(qw.scale).all() and (qw.scale != 0).all()


def test_gptq_hessians_see_earlier_linears_hard_and_own_weights_fp(tiny_llama, windows,
                                                                   gptq_hessians):
    """Method §3.1 plus true-sequential GPTQ: a linear's GPTQ Hessian is collected with the block's
    earlier stages and the earlier GPTQ groups of its own stage quantized (o after v, down after
    gate/up), and its own weights still in full precision."""
    seen = gptq_hessians
    model = tiny_llama(0)
    records, _ = run_quantization(model, adapter_for("llama"), windows, _cfg("gptq", max_blocks=1),
                                  CPU, progress=False)
    H_o, H_gate, H_down = seen[3], seen[4], seen[6]  # q, k, v, o, gate, up, down

    def hessian(hard: tuple[str, ...], name: str):
        m = tiny_llama(0)
        with torch.no_grad():
            for n in hard:
                full = "model.layers.0." + n
                m.get_submodule(full).weight.copy_(records[full].dequantize())
        with collect_hessians(m.model.layers[0], [name]) as accs, torch.no_grad():
            m(input_ids=windows["gptq"], use_cache=False)
        return accs[name].H

    q, k, v, o, gate, up, _ = LINEARS
    torch.testing.assert_close(H_o, hessian((q, k, v), o), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(H_o, hessian((q, k), o), rtol=1e-3, atol=1e-5)  # v already hard
    assert not torch.allclose(H_o, hessian((), o), rtol=1e-3, atol=1e-5)  # q/k already hard
    torch.testing.assert_close(H_gate, hessian((q, k, v, o), gate), rtol=1e-4, atol=1e-6)
    # down_proj is fitted after gate/up are quantized: its inputs come through the hard gate/up
    torch.testing.assert_close(H_down, hessian((q, k, v, o, gate, up), "mlp.down_proj"),
                               rtol=1e-4, atol=1e-6)
    assert not torch.allclose(H_down, hessian((q, k, v, o), "mlp.down_proj"), rtol=1e-3,
                              atol=1e-5)


