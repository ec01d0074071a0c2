"""`gsq plan`: predictions from the config alone, the spill decision against the host budget,
the activation count against the tensors the block loop really holds, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from gsq.calib.sequential import Buffers, quantize_block
from gsq.cli.__main__ import main
from gsq.config import cpu_preset
from gsq.models.registry import adapter_for
from gsq.plan import activation_bytes, model_shapes, plan, plan_source
from gsq.quant.trainer import TrainConfig


def _cfg(**changes):
    base = dict(group_size=32, nsamples=4, val_samples=2, gptq_samples=4, seqlen=16, qk_steps=2,
                train=TrainConfig(epochs=1, batch_size=2, micro_batch_size=2))
    return cpu_preset(**{**base, **changes})


@pytest.fixture
def config_only(tmp_path):
    """A folder with the config.json of a 1.1B-parameter Llama and no weights."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                tie_word_embeddings=False).save_pretrained(tmp_path)
    return tmp_path


def test_plan_reads_the_config_only(config_only):
    p = plan_source(str(config_only), _cfg(method="gptq"), host_budget_gib=64)
    block = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048  # 8 kv heads of 64
    assert p["blocks_total"] == 16 and p["block_parameters"] == block
    assert p["parameters"] == 16 * block + 2 * 32000 * 2048 + 2048
    assert p["peak_gpu_gib"] is None and p["seconds_per_block"] > 0
    assert not p["activations_spilled"]


def test_spill_decision_follows_the_budget(config_only):
    roomy = plan_source(str(config_only), _cfg(nsamples=512, seqlen=512), host_budget_gib=512)
    tight = plan_source(str(config_only), _cfg(nsamples=512, seqlen=512), host_budget_gib=1)
    assert not roomy["activations_spilled"] and tight["activations_spilled"]
    assert tight["peak_host_gib"] < tight["peak_host_gib_activations_in_ram"]
    assert tight["disk_activations_gib"] > roomy["disk_activations_gib"]


def test_gpu_plan_keeps_activations_on_the_device_when_they_fit(config_only):
    p = plan_source(str(config_only), _cfg(), device="cuda", host_budget_gib=64)
    assert p["activations_home"] == "device" and p["peak_gpu_gib"] > 0
    offload = plan_source(str(config_only), _cfg(offload_activations=True), device="cuda",
                          host_budget_gib=64)
    assert offload["activations_home"] == "host"
    assert offload["peak_gpu_gib"] < p["peak_gpu_gib"]


@pytest.mark.parametrize("method", ["gptq", "gsq"])
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_activation_count_matches_the_block_loop(tiny_llama, tiny_moe, method, arch):
    """The plan's activation peak equals the host tensors of hidden states alive at once in
    `quantize_block` (inputs, targets, stage inputs, next inputs), counted by a store."""
    from gsq.calib.cache import ActivationStore

    cfg = _cfg(method=method)
    model = tiny_llama(0) if arch == "llama" else tiny_moe(arch)
    adapter = adapter_for(arch)
    alive, peak = {}, [0]

    class Counting(ActivationStore):
        def empty(self, shape, dtype=torch.float32):
            import weakref

            tensor = super().empty(shape, dtype)
            alive[id(tensor)] = tensor.numel() * tensor.element_size()
            weakref.finalize(tensor, alive.pop, id(tensor), None)
            peak[0] = max(peak[0], sum(alive.values()) + inputs)
            return tensor

    gen = torch.Generator().manual_seed(0)
    bufs = Buffers(*(torch.randn(n, cfg.seqlen, 64, generator=gen)
                     for n in (cfg.nsamples, cfg.val_samples, cfg.gptq_samples)),
                   store=Counting())
    inputs = sum(x.numel() * 4 for _, x in bufs.items())
    block = adapter.blocks(model)[0]
    quantize_block(block, 0, adapter, cfg, bufs, _ctx(model, adapter, cfg), progress=False)
    assert activation_bytes(model_shapes(model, adapter, cfg), cfg)["peak"] == peak[0]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_plan_counts_every_expert_weight(tiny_moe, arch):
    """The weights the plan counts as quantized are those `quantize_block` returns records for
    (every routed expert's gate/up/down), and the per-token FLOPs see k of the E experts."""
    cfg = _cfg(method="rtn")
    model, adapter = tiny_moe(arch), adapter_for(arch)
    shapes = model_shapes(model, adapter, cfg)
    block = adapter.blocks(model)[0]
    gen = torch.Generator().manual_seed(0)
    bufs = Buffers(*(torch.randn(n, cfg.seqlen, 64, generator=gen)
                     for n in (cfg.nsamples, cfg.val_samples, cfg.gptq_samples)))
    records, _, _ = quantize_block(block, 0, adapter, cfg, bufs, _ctx(model, adapter, cfg),
                                   progress=False)
    assert shapes.n_experts == 4 and shapes.top_k == 2
    assert shapes.quantized_weights() == sum(qw.codes.numel() for qw in records.values())
    assert len(shapes.linears("mlp")) == 4 * 3
    attention = sum(o * i for o, i in shapes.stages["qk"] + shapes.stages["vo"])
    expert = sum(o * i for group in shapes.expert_groups["mlp"] for o, i in group)
    assert shapes.tokens_flops() == 2 * (attention + 2 * expert)


@pytest.fixture
def moe_config_only(tmp_path):
    """The config.json of a Qwen3-MoE (128 experts, 8 per token) cut to 4 blocks, no weights."""
    from transformers import Qwen3MoeConfig

    Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                   num_experts_per_tok=8, vocab_size=151936,
                   tie_word_embeddings=False).save_pretrained(tmp_path)
    return tmp_path


def test_moe_plan_from_the_config(moe_config_only):
    """Every expert's parameters are counted, and a GPTQ run's host peak holds one Hessian per
    expert and input stream (E x (hidden^2 + I^2) fp32) beyond what RTN needs."""
    gptq = plan_source(str(moe_config_only), _cfg(method="gptq"), host_budget_gib=64)
    rtn = plan_source(str(moe_config_only), _cfg(method="rtn"), host_budget_gib=64)
    hidden, inter, experts = 2048, 768, 128
    attention = 2 * hidden * 32 * 128 + 2 * hidden * 4 * 128 + 2 * 128  # q/o, k/v, q/k norms
    block = attention + experts * 3 * hidden * inter + experts * hidden + 2 * hidden
    assert gptq["block_parameters"] == block
    assert gptq["parameters"] == 4 * block + 2 * 151936 * hidden + hidden
    hessians = experts * (hidden ** 2 + inter ** 2) * 4
    assert (gptq["peak_host_gib"] - rtn["peak_host_gib"]) * 2**30 >= hessians


def _ctx(model, adapter, cfg):
    from gsq.calib.capture import capture_block_context

    return capture_block_context(model, adapter, cfg.seqlen, torch.device("cpu"))


def test_plan_is_deterministic_given_rates(tiny_llama):
    model, adapter = tiny_llama(0), adapter_for("llama")
    shapes = model_shapes(model, adapter, _cfg())
    one = plan(shapes, _cfg(), torch.device("cpu"), 8, baseline_bytes=2**28, rates=(1e9, 1e8))
    two = plan(shapes, _cfg(), torch.device("cpu"), 8, baseline_bytes=2**28, rates=(1e9, 1e8))
    assert one == two
    slower = plan(shapes, _cfg(), torch.device("cpu"), 8, baseline_bytes=2**28, rates=(5e8, 5e7))
    assert slower["seconds_per_block"] == pytest.approx(2 * one["seconds_per_block"])


def test_cli_plan(config_only, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["-q", "plan", str(config_only), "--method", "gsq", "--max-host-memory", "64",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "peak host" in text and "s per block" in text and "16 blocks" in text
    saved = json.loads(out.read_text())
    assert saved["method"] == "gsq" and saved["host_budget_gib"] == 64


def test_cli_plan_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=4).save_pretrained(tmp_path)
    assert main(["-q", "plan", str(tmp_path)]) == 2
    assert "gpt2" in capsys.readouterr().err


def test_bpw_plan_counts_the_sensitivity_pass_and_the_widest_width(config_only):
    """--bpw: time for the sensitivity pass (a block forward per linear and width), and GSQ
    training memory of the widest width a linear may get (4 bit: 5 candidates, not 2 bit's 4)."""
    def predict(**changes):
        return plan_source(str(config_only), _cfg(**changes), host_budget_gib=64)

    plain, bpw, four = predict(), predict(bpw=3.0), predict(bits=4)
    assert bpw["seconds_per_block"] > four["seconds_per_block"]
    assert bpw["seconds_per_block"] > plain["seconds_per_block"]
    assert bpw["peak_host_gib"] == pytest.approx(four["peak_host_gib"], rel=1e-3)  # RSS moves
    assert bpw["peak_host_gib"] > plain["peak_host_gib"]


def test_e2e_stage_streams_when_the_whole_model_does_not_fit(config_only):
    """auto: whole model in memory under a roomy budget, streamed under a tight one (one block,
    one step's activations, the multipliers: far below the model's fp32 size); on/off force it."""
    from gsq.plan import format_plan

    cfg = _cfg(nsamples=8, seqlen=64)
    roomy = plan_source(str(config_only), cfg, host_budget_gib=512)
    tight = plan_source(str(config_only), cfg, host_budget_gib=3)
    assert roomy["e2e_streamed"] is False and tight["e2e_streamed"] is True
    assert roomy["e2e_stage_gib"] == pytest.approx(roomy["e2e_whole_model_gib"])
    assert tight["e2e_stage_gib"] < tight["e2e_whole_model_gib"] / 2
    assert tight["peak_host_gib"] < roomy["peak_host_gib"]
    assert plan_source(str(config_only), cfg, host_budget_gib=512,
                       e2e_streamed="on")["e2e_streamed"] is True
    assert plan_source(str(config_only), cfg, host_budget_gib=3,
                       e2e_streamed="off")["e2e_streamed"] is False
    assert "streams one block at a time" in format_plan(tight)
    assert plan_source(str(config_only), _cfg(method="gptq"))["e2e_streamed"] is None
