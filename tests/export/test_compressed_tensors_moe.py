"""compressed-tensors export of MoE models (Qwen3-MoE, Mixtral): per-expert packed tensors named as
in the checkpoint (vLLM's per-expert layout), routers left dense and listed in `ignore`, and
transformers loads the experts into its fused parameters with logits equal to gsq's model."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from gsq.calib.sequential import run_quantization
from gsq.config import QuantizeConfig
from gsq.export.compressed_tensors import export_compressed_tensors
from gsq.io.quantized_dir import load_records, save_quantized
from gsq.models.quantized import load_quantized
from gsq.models.registry import adapter_for

pytest.importorskip("compressed_tensors")

ARCHS = ("qwen3_moe", "mixtral")
TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def qdir(tmp_path_factory, tiny_moe, byte_tokenizer, random_windows):
    """gsq directory of a tiny MoE quantized with GPTQ (2-bit g32), built once per arch."""
    cache = {}

    def make(arch):
        if arch not in cache:
            model = tiny_moe(arch)
            cfg = QuantizeConfig(method="gptq", bits=2, group_size=32, nsamples=4, val_samples=2,
                                 gptq_samples=4, seqlen=16, moe_min_tokens=4)
            windows = random_windows({"train": 4, "val": 2, "gptq": 4}, 16, seed=1)
            records, report = run_quantization(model, adapter_for(arch), windows, cfg,
                                               torch.device("cpu"), progress=False)
            out = tmp_path_factory.mktemp("gsq-moe") / arch
            save_quantized(out, model, byte_tokenizer, records, cfg.to_dict(), report)
            cache[arch] = (out, model, records)
            bf16 = out.with_name(f"{arch}-bf16")  # the same codes in a bf16 checkpoint
            save_quantized(bf16, copy.deepcopy(model).to(torch.bfloat16), byte_tokenizer,
                           records, cfg.to_dict(), report)
        return cache[arch]

    return make


def _load(path, dequantize, dtype=None):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    if not dequantize:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    with warnings.catch_warnings():  # "quantization_config from the model will be used"
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype,
            quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_load_quantized_round_trips_moe(qdir, arch):
    """The directory's expert codes come back into the fused parameters exactly."""
    path, model, records = qdir(arch)
    loaded, _, loaded_records = load_quantized(path)
    adapter = adapter_for(arch)
    assert set(loaded_records) == set(records)
    for name, qw in records.items():
        assert torch.equal(loaded_records[name].codes, qw.codes)
        assert torch.equal(adapter.model_weight(loaded, name), qw.dequantize()), name
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("container", [None, 4])
def test_transformers_loads_the_export_with_gsq_logits(qdir, tmp_path, arch, container):
    path, _, records = qdir(arch)
    out = tmp_path / "ct"
    report = export_compressed_tensors(path, out, container_bits=container)
    reference, _, _ = load_quantized(path)
    expected = _logits(reference)
    for dequantize in (False, True):
        torch.testing.assert_close(_logits(_load(out, dequantize)), expected, rtol=0, atol=0)

    vllm_note = [n for n in report["notes"] if "fused-MoE kernels take 4- or 8-bit" in n]
    assert bool(vllm_note) == (container is None)  # native 2-bit experts: vLLM needs a container


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_export_loads_like_the_plain_bf16_checkpoint(qdir, tmp_path, arch):
    """A bf16 directory's export, loaded in bf16 (how such models are run), gives exactly the
    logits of the directory itself loaded as a plain bf16 checkpoint. (Loaded with
    `dtype=torch.float32`, transformers decompresses the fused experts in the checkpoint's scale
    dtype, bf16, and computes them in it: logits then differ by bf16 rounding, not by a weight.)"""
    path, _, _ = qdir(arch)
    bf16 = path.with_name(f"{arch}-bf16")
    export_compressed_tensors(bf16, tmp_path / "ct")
    expected = _logits(_load(bf16, False, torch.bfloat16))
    torch.testing.assert_close(_logits(_load(tmp_path / "ct", False, torch.bfloat16)), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_names_experts_per_checkpoint_tensor(qdir, tmp_path, arch):
    """One weight_packed/weight_scale/weight_shape per expert projection under its checkpoint
    name; routers stay dense and are ignored; one "Linear" config group (vLLM's fused-MoE layer
    takes the Linear scheme)."""
    path, model, records = qdir(arch)
    out = tmp_path / "ct"
    export_compressed_tensors(path, out)
    tensors = load_file(str(out / "model.safetensors"))
    adapter = adapter_for(arch)
    experts = adapter.expert_linears(model)
    assert set(experts) <= set(records)
    for name in experts:
        assert f"{name}.weight" not in tensors
        assert tensors[f"{name}.weight_shape"].tolist() == list(records[name].shape)
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        assert tensors[f"{name}.weight_scale"].shape == records[name].scale.shape
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    routers = [f"model.layers.{i}.{adapter.moe_prefix}gate" for i in range(2)]
    for router in routers:
        assert f"{router}.weight" in tensors and router in qconfig["ignore"]
    assert [g["targets"] for g in qconfig["config_groups"].values()] == [["Linear"]]
    assert load_records(path).keys() == records.keys()
