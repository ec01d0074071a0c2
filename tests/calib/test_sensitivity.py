import fnmatch

import pytest
import torch

from gsq.calib.sensitivity import block_units, measure_sensitivity
from gsq.config import QuantizeConfig
from gsq.models.registry import adapter_for


def _cfg(**kw):
    return QuantizeConfig(method="rtn", bits=2, group_size=16, nsamples=4, val_samples=2,
                          gptq_samples=2, seqlen=16, **kw)


def test_every_linear_measured_and_more_bits_perturb_less(tiny_llama, random_windows):
    model = tiny_llama()
    adapter = adapter_for(model.config.model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = random_windows({"train": 4}, 16)["train"]
    choices = measure_sensitivity(model, adapter, windows, _cfg(), torch.device("cpu"),
                                  progress=False)
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in adapter.linear_names()]
    assert sorted(c.name for c in choices) == sorted(names)
    for c in choices:
        assert c.err[2] > c.err[3] > c.err[4] > 0, c
        W = model.get_submodule(c.name).weight
        assert c.numel == W.numel()
        assert c.bpp == {2: 3.0, 3: 4.0, 4: 5.0}  # code bits + 16 / 16
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored


def test_error_is_the_relative_block_output_change(tiny_llama, random_windows):
    """Recompute one entry by hand: block 1's down_proj at 2 bit."""
    from gsq.calib.capture import capture_block_context
    from gsq.quant.rtn import rtn_quantize
    from gsq.quant.types import QuantSpec

    model = tiny_llama()
    adapter = adapter_for(model.config.model_type)
    windows = random_windows({"train": 2}, 16)["train"]
    choices = {c.name: c for c in measure_sensitivity(model, adapter, windows, _cfg(),
                                                       torch.device("cpu"), progress=False)}
    block = model.model.layers[1]
    seen = {}

    def keep_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    handle = block.register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad():
        model(windows)
    handle.remove()
    ctx = capture_block_context(model, adapter, 16, torch.device("cpu"))
    W = block.mlp.down_proj.weight
    with torch.no_grad():
        out = adapter.block_forward(block, seen["x"], ctx)
        saved = W.clone()
        W.copy_(rtn_quantize(W, QuantSpec(2, 16)).dequantize(W.dtype))
        out_q = adapter.block_forward(block, seen["x"], ctx)
        W.copy_(saved)
    expect = float(((out_q - out) ** 2).mean() / (out ** 2).mean())
    assert choices["model.layers.1.mlp.down_proj"].err[2] == pytest.approx(expect, rel=1e-4)


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_experts_share_a_unit_per_projection(tiny_moe, random_windows, arch):
    model = tiny_moe(arch)
    adapter = adapter_for(model.config.model_type)
    block = adapter.blocks(model)[0]
    prefix = adapter.first_block_prefix().format(i=0)
    units = block_units(adapter, block, _cfg(), prefix)
    experts = adapter.experts(block)
    routed = [prefix + n for linears in experts.values() for n in linears]
    grouped = [u for u in units if "*" in u]
    assert len(grouped) == 3
    for pattern in grouped:  # each pattern covers one projection of every expert, nothing else
        covered = [n for n in routed if fnmatch.fnmatch(n, pattern)]
        assert len(covered) == len(experts)
        assert sorted(prefix + n for n in units[pattern]) == sorted(covered)
    windows = random_windows({"train": 2}, 16)["train"]
    choices = measure_sensitivity(model, adapter, windows, _cfg(), torch.device("cpu"),
                                  progress=False)
    by_name = {c.name: c for c in choices}
    for pattern in grouped:
        assert by_name[pattern].numel == sum(adapter.weight(block, n).numel()
                                             for n in units[pattern])
    assert all(c.err[2] >= c.err[4] for c in choices)
