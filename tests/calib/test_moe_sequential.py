"""The block loop on tiny Qwen3-MoE and Mixtral models: every expert linear quantized into the
fused parameters, per-expert token counts in the report, starved-expert fallbacks."""

from __future__ import annotations

import pytest
import torch

from gsq.api import moe_report
from gsq.calib.sequential import run_quantization
from gsq.config import QuantizeConfig
from gsq.models.registry import adapter_for
from gsq.quant.trainer import TrainConfig

ARCHS = ("qwen3_moe", "mixtral")
SEQLEN, E, K = 32, 4, 2
COUNTS = {"train": 16, "val": 4, "gptq": 8}
CPU = torch.device("cpu")
STARVED = 3  # the expert the starved-model fixture never routes to


def _cfg(method, **changes):
    base = QuantizeConfig(method=method, bits=2, group_size=32, nsamples=16, val_samples=4,
                          gptq_samples=8, seqlen=SEQLEN, qk_steps=10, moe_min_tokens=16,
                          train=TrainConfig(epochs=2, batch_size=8, micro_batch_size=4))
    return base.replace(**changes)


def starve_expert(model, expert: int):
    """Make the routers never choose `expert`: hidden coordinate 0 is the same positive constant
    in every token embedding (the others of unit scale, so tokens still differ), the other
    experts' router rows ignore it and the starved one's row is very negative on it."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 1:] *= 50.0
        model.model.embed_tokens.weight[:, 0] = 4.0
        for block in model.model.layers:
            block.mlp.gate.weight[:, 0] = 0.0
            block.mlp.gate.weight[expert, 0] = -100.0
    return model


@pytest.fixture(scope="module")
def windows(random_windows):
    return random_windows(COUNTS, SEQLEN, seed=0)


@pytest.fixture(scope="module")
def run(tiny_moe, windows):
    """run(arch, cfg, starved=False) -> (model, records, report, original model); cached."""
    cache = {}

    def _run(arch, cfg, starved=False):
        key = (arch, repr(cfg), starved)
        if key not in cache:
            model, original = tiny_moe(arch), tiny_moe(arch)
            if starved:
                starve_expert(model, STARVED), starve_expert(original, STARVED)
            records, report = run_quantization(model, adapter_for(arch), windows, cfg, CPU,
                                               progress=False)
            cache[key] = (model, records, report, original)
        return cache[key]

    return _run


def _expert_reports(report, block):
    return report["blocks"][block]["stages"][-1]["experts"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["rtn", "gptq", "gsq"])
def test_every_expert_linear_is_quantized_into_the_fused_weights(run, arch, method):
    model, records, report, original = run(arch, _cfg(method))
    adapter = adapter_for(arch)
    experts = adapter.expert_linears(model)
    attention = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    assert set(records) == set(experts) | set(attention)
    for name in experts:
        qw = records[name]
        live = adapter.model_weight(model, name)
        assert qw.codes.dtype == torch.int8 and qw.spec.bits == 2
        assert torch.equal(live, qw.dequantize(live.dtype)), name
        assert not torch.equal(live, adapter.model_weight(original, name)), name
    assert report["blocks"][1]["val_block_rel_mse"] < 1.0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["rtn", "gsq"])
def test_report_counts_routed_tokens_per_expert(run, arch, method):
    """Per layer, the tokens of all experts sum to tokens x top-k for each split counted: the
    GPTQ split always, the train split when GSQ trains."""
    model, _, report, _ = run(arch, _cfg(method))
    prefix = adapter_for(arch).moe_prefix
    for block in (0, 1):
        experts = _expert_reports(report, block)
        assert [e["expert"] for e in experts] == [f"model.layers.{block}.{prefix}experts.{e}"
                                                  for e in range(E)]
        assert sum(e["tokens_gptq"] for e in experts) == COUNTS["gptq"] * SEQLEN * K
        if method == "gsq":
            assert sum(e["tokens_train"] for e in experts) == COUNTS["train"] * SEQLEN * K
        else:
            assert all("tokens_train" not in e for e in experts)
        assert all(e["fallback"] == [] and e["tokens_gptq"] >= 16 for e in experts)


def test_gptq_split_counts_are_those_of_the_hessians(run, windows, tiny_moe, monkeypatch):
    """The reported GPTQ-split count of an expert is the number of rows of its Hessian."""
    from gsq.calib import sequential

    seen = {}
    real = sequential._hessians

    def spy(bc, adapter, names, x, micro, pooled=frozenset(), owners=None):
        with adapter.hessian_collector(bc.block, names, pooled) as accs:
            for chunk in x.split(micro):
                adapter.block_forward(bc.block, chunk, bc.ctx)
        seen.update({bc.prefix + n: acc.n_samples for n, acc in accs.items()})
        return real(bc, adapter, names, x, micro, pooled, owners)

    monkeypatch.setattr(sequential, "_hessians", spy)
    model = tiny_moe("mixtral")
    _, report = run_quantization(model, adapter_for("mixtral"), windows, _cfg("gptq"), CPU,
                                 progress=False)
    for block in (0, 1):
        for e in _expert_reports(report, block):
            for part in ("w1", "w3", "w2"):
                assert seen[f"{e['expert']}.{part}"] == e["tokens_gptq"]


@pytest.mark.parametrize("arch", ARCHS)
def test_starved_expert_takes_the_fallbacks_and_is_reported(run, arch):
    """An expert the router never chooses: GPTQ on its layer's pooled Hessians (finite, not
    plain RTN), GSQ keeps those codes; report.json names it for both fallbacks."""
    model, gptq, report, _ = run(arch, _cfg("gptq"), starved=True)
    mlp_only = _cfg("gsq", gsq_stages=("mlp",))  # attention keeps GPTQ: same MLP inputs as gptq
    _, gsq, gsq_report, _ = run(arch, mlp_only, starved=True)
    adapter = adapter_for(arch)
    for block in (0, 1):
        experts = _expert_reports(gsq_report, block)
        starved = experts[STARVED]
        assert starved["tokens_gptq"] == 0 and starved["tokens_train"] == 0
        assert starved["fallback"] == ["pooled_hessian", "kept_init"]
        assert all(e["fallback"] == [] for i, e in enumerate(experts) if i != STARVED)
        assert _expert_reports(report, block)[STARVED]["fallback"] == ["pooled_hessian"]
        prefix = f"model.layers.{block}."
        for part in range(3):
            name = prefix + adapter.expert_name(STARVED, part)
            assert torch.isfinite(gptq[name].scale).all() and (gptq[name].scale != 0).all()
            if block == 0:  # same inputs as the gptq run up to here: it kept the GPTQ codes
                assert torch.equal(gsq[name].codes, gptq[name].codes)
                assert torch.equal(gsq[name].scale, gptq[name].scale)
    trained = "model.layers.0." + adapter.expert_name(0, 2)
    assert not torch.equal(gsq[trained].codes, gptq[trained].codes)
    summary = moe_report(mlp_only, gsq_report)["moe"]
    names = [f"model.layers.{b}.{adapter.moe_prefix}experts.{STARVED}" for b in (0, 1)]
    assert summary == {"min_tokens": 16, "experts": 2 * E, "pooled_hessian": names,
                       "kept_init": names}


def test_e2e_scale_stage_keeps_expert_scales_and_trains_the_rest(tiny_moe):
    """The end-to-end scale stage runs on an MoE model: the experts (slices of fused parameters)
    keep their scales and are reported frozen; attention scales are trained; the model holds
    scale * codes for every record."""
    from gsq.api import quantize_model
    from gsq.config import E2EConfig

    cfg = _cfg("rtn", nsamples=8, e2e=E2EConfig(epochs=1, lr=1e-2, batch_size=4,
                                                micro_batch_size=4))
    model, plain = tiny_moe("mixtral"), tiny_moe("mixtral")
    tokens = torch.randint(0, 256, (40 * SEQLEN,), generator=torch.Generator().manual_seed(1))
    records, report = quantize_model(model, None, cfg, tokens, CPU, False)
    before, _ = quantize_model(plain, None, cfg.replace(e2e=E2EConfig()), tokens, CPU, False)
    adapter = adapter_for("mixtral")
    experts = set(adapter.expert_linears(model))
    assert set(report["e2e"]["frozen"]) == experts and report["e2e"]["best_epoch"] == 1
    for name, qw in records.items():
        assert torch.equal(adapter.model_weight(model, name), qw.dequantize()), name
        assert torch.equal(qw.scale, before[name].scale) == (name in experts), name
