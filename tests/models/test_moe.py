"""MoE adapters (Qwen3-MoE, Mixtral): checkpoint naming of expert linears, their slices of the
fused parameters, trial weights, routed token counts and per-expert Hessians."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call

from gsq.models.registry import adapter_for
from gsq.quant.hessian import HessianAccumulator

ARCHS = ("qwen3_moe", "mixtral")
E, K = 4, 2  # experts, top-k of the tiny models


def _post_attention(adapter, block, h):
    """Normalised MoE inputs `(T, H)` and the router's top-k expert ids `(T, K)`."""
    x = block.post_attention_layernorm(h).reshape(-1, h.shape[-1])
    _, _, top_k = block.mlp.gate(x)
    return x, top_k


def _inner(adapter, block, e, x):
    """act(x gate_eᵀ) * (x up_eᵀ) from the adapter's weight views (the down projection's input)."""
    gate = adapter.weight(block, adapter.expert_name(e, 0))
    up = adapter.weight(block, adapter.expert_name(e, 1))
    return block.mlp.experts.act_fn(x @ gate.T) * (x @ up.T)


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_names_are_the_checkpoint_tensors(tiny_moe, tmp_path, arch):
    """Each record name + ".weight" is a tensor save_pretrained writes, holding exactly the
    adapter's slice of the fused parameter (so gate and up are not swapped)."""
    model = tiny_moe(arch)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    adapter = adapter_for(arch)
    experts = adapter.expert_linears(model)
    assert len(experts) == 2 * E * 3
    for name in experts:
        assert torch.equal(saved[name + ".weight"], adapter.model_weight(model, name)), name
    ignored = set(adapter.checkpoint_linears(model)) - set(experts)
    assert {n + ".weight" for n in ignored} <= set(saved)  # routers and lm_head are 2-D tensors
    assert sum(".gate" in n and "experts" not in n for n in ignored) == 2  # one router per block


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_block_equals_routed_sum_of_weight_views(tiny_moe, arch):
    """The MoE output is Σ_topk p_e · down_e(act(gate_e x) * up_e x) with the adapter's views."""
    model = tiny_moe(arch)
    adapter = adapter_for(arch)
    block = adapter.blocks(model)[0]
    h = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    x = block.post_attention_layernorm(h).reshape(-1, 64)
    _, probs, top_k = block.mlp.gate(x)
    expected = torch.zeros_like(x)
    for e in range(E):
        tok, slot = torch.where(top_k == e)
        down = adapter.weight(block, adapter.expert_name(e, 2))
        expected[tok] += probs[tok, slot, None] * (_inner(adapter, block, e, x[tok]) @ down.T)
    torch.testing.assert_close(block.mlp(block.post_attention_layernorm(h)).reshape(-1, 64),
                               expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_trial_params_put_expert_weights_in_place(tiny_moe, arch):
    """functional_call with trial weights = the forward after writing them through `weight`;
    gradients reach every trial weight of a routed expert."""
    adapter = adapter_for(arch)
    model, edited = tiny_moe(arch), tiny_moe(arch)
    block, block2 = adapter.blocks(model)[1], adapter.blocks(edited)[1]
    gen = torch.Generator().manual_seed(1)
    names = [adapter.expert_name(0, 0), adapter.expert_name(2, 1), adapter.expert_name(3, 2),
             "self_attn.o_proj"]
    trial = {n: (adapter.weight(block, n) + 0.05 * torch.randn(adapter.weight(block, n).shape,
                                                                 generator=gen)).requires_grad_()
             for n in names}
    with torch.no_grad():
        for n, w in trial.items():
            adapter.weight(block2, n).copy_(w)
    h = torch.randn(2, 8, 64, generator=gen)
    out = functional_call(block.mlp, {k.removeprefix("mlp."): v for k, v in
                                      adapter.trial_params(block, trial).items()
                                      if k.startswith("mlp.")}, (h,))
    torch.testing.assert_close(out, block2.mlp(h), rtol=1e-5, atol=1e-6)
    assert not torch.equal(out, block.mlp(h))  # the live weights are untouched
    out.square().sum().backward()
    for n in names[:3]:
        assert trial[n].grad is not None and trial[n].grad.abs().sum() > 0, n


@pytest.mark.parametrize("arch", ARCHS)
def test_token_counts_and_per_expert_hessians(tiny_moe, arch):
    """Counts sum to tokens x top-k; each expert's gate/up/down Hessians equal a direct
    computation on exactly the tokens routed to it; pooled ones use every token."""
    adapter = adapter_for(arch)
    block = adapter.blocks(tiny_moe(arch))[0]
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(3, 8, 64, generator=gen), torch.randn(2, 5, 64, generator=gen)]
    counts = sum(adapter.expert_token_counts(block, h) for h in batches)
    assert counts.tolist() and int(counts.sum()) == (24 + 10) * K

    names = [n for e in range(E) for n in (adapter.expert_name(e, p) for p in range(3))]
    pooled = frozenset({adapter.expert_name(1, 0), adapter.expert_name(1, 2)})
    with adapter.hessian_collector(block, names, pooled) as accs:
        for h in batches:
            adapter.mlp_residual(block, h)
    direct = {n: HessianAccumulator(adapter.weight(block, n).shape[1]) for n in names}
    for h in batches:
        x, top_k = _post_attention(adapter, block, h)
        for e in range(E):
            routed = x[(top_k == e).any(-1)]
            for p, inputs in ((0, routed), (1, routed), (2, _inner(adapter, block, e, routed))):
                name = adapter.expert_name(e, p)
                if name in pooled:  # every token of the layer
                    inputs = x if p == 0 else _inner(adapter, block, e, x)
                direct[name].add(inputs)
    for name in names:
        torch.testing.assert_close(accs[name].H, direct[name].H, rtol=1e-4, atol=1e-6)
        assert accs[name].n_samples == direct[name].n_samples, name
    e0 = adapter.expert_name(0, 0)
    assert accs[e0].n_samples == int(counts[0])
    assert accs[adapter.expert_name(1, 0)].n_samples == 34  # pooled: all tokens
    assert not block.mlp.experts._forward_pre_hooks  # hooks removed


def test_qwen3_moe_dense_layers_keep_the_llama_mlp(tiny_moe):
    """Blocks in mlp_only_layers have a dense MLP: Llama stages, no experts."""
    model = tiny_moe("qwen3_moe", mlp_only_layers=[1])
    adapter = adapter_for("qwen3_moe")
    dense, sparse = adapter.blocks(model)[1], adapter.blocks(model)[0]
    assert adapter.experts(dense) == {}
    assert adapter.block_stages(dense)[-1].linears == ("mlp.gate_proj", "mlp.up_proj",
                                                       "mlp.down_proj")
    mlp = adapter.block_stages(sparse)[-1]
    assert len(mlp.linears) == 3 * E and mlp.gptq_groups(list(mlp.linears))[1] == [
        adapter.expert_name(e, 2) for e in range(E)]
    assert "model.layers.1.mlp.gate_proj" in adapter.checkpoint_linears(model)
    assert "model.layers.1.mlp.gate" not in adapter.checkpoint_linears(model)


@pytest.mark.parametrize(("arch", "gguf_arch"), [("qwen3_moe", "QWEN3MOE"), ("mixtral", "LLAMA")])
def test_merged_expert_names_map_to_gguf_expert_tensors(tiny_moe, arch, gguf_arch):
    """What a GGUF exporter needs: merged names that the gguf package maps to ffn_*_exps, each
    with the expert records in expert order; the router maps to ffn_gate_inp."""
    import gguf

    model = tiny_moe(arch)
    adapter = adapter_for(arch)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_arch), 2)
    merged = adapter.merged_experts(model)
    assert sorted(names.get_name(m) for m in merged) == sorted(
        f"blk.{i}.ffn_{p}_exps" for i in range(2) for p in ("gate", "up", "down"))
    for merged_name, experts in merged.items():
        assert experts == [merged_name.replace("experts.", f"experts.{e}.") for e in range(E)]
        assert set(experts) <= set(adapter.expert_linears(model))
    for i in range(2):
        assert names.get_name(f"model.layers.{i}.{adapter.moe_prefix}gate") == \
            f"blk.{i}.ffn_gate_inp"
