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
def test_activation_count_matches_the_block_loop(tiny_llama, random_windows, method):
    """The plan's activation peak equals the host tensors of hidden states alive at once in
    `quantize_block` (inputs, targets, stage inputs, next inputs), counted by a store."""
    from gsq.calib.cache import ActivationStore

    cfg = _cfg(method=method)
    model, adapter = tiny_llama(0), adapter_for("llama")
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
