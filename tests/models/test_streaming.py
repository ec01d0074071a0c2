"""Quantizing a model streamed from disk block by block gives what quantizing it in memory gives.

For each kind of source (fp32 safetensors, bf16 safetensors in several shards with an index, an
F16 GGUF file, a PyTorch .bin folder served from memory), `gsq.quantize` (streaming) and
`quantize_model` on the model loaded whole must produce the same codes and scales, and the output
directory must hold every tensor gsq did not quantize exactly as the source stores it, in the
source's dtype, with the quantized linears holding s·codes in that dtype. Only the current block
holds real tensors while the loop runs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gsq.api import calibration_tokens, load_any_model, quantize, quantize_model
from gsq.config import cpu_preset
from gsq.io.shards import INDEX_FILE, checkpoint_files
from gsq.models.registry import adapter_for
from gsq.models.streaming import StreamedBlocks, open_model
from gsq.quant.trainer import TrainConfig

WORDS = ("the", "of", "and", "to", "in", "is", "was", "that", "for", "on", "with", "as", "by")


def _cfg(method: str, **changes):
    return cpu_preset(method=method, group_size=32, nsamples=4, val_samples=2, gptq_samples=4,
                      seqlen=16, qk_steps=2, max_blocks=1,
                      train=TrainConfig(epochs=1, batch_size=2, micro_batch_size=2), **changes)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(600)))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_llama, build_byte_bpe_tokenizer):
    """source kind -> model path (the same random untied Llama in every form)."""
    from gsq.export.gguf_file import write_base_gguf

    root = tmp_path_factory.mktemp("sources")
    tokenizer = build_byte_bpe_tokenizer()
    model = tiny_llama(3, vocab_size=len(tokenizer), tie_word_embeddings=False)
    paths = {kind: root / kind for kind in ("fp32", "bf16", "bin")}
    model.save_pretrained(paths["fp32"])
    model.to(torch.bfloat16).save_pretrained(paths["bf16"], max_shard_size="40KB")
    model.float()
    paths["bin"].mkdir()
    model.config.save_pretrained(paths["bin"])
    torch.save(model.state_dict(), paths["bin"] / "pytorch_model.bin")
    for path in paths.values():
        tokenizer.save_pretrained(path)
    paths["gguf"] = root / "model-f16.gguf"
    write_base_gguf(str(paths["fp32"]), paths["gguf"], float_type="F16")
    return {kind: str(path) for kind, path in paths.items()}


def test_sources_are_what_the_test_means(sources):
    assert (Path(sources["bf16"]) / INDEX_FILE).is_file()
    assert len(set(checkpoint_files(sources["bf16"]).values())) > 1
    kinds = {kind: open_model(path).source.kind for kind, path in sources.items()}
    assert kinds == {"fp32": "safetensors", "bf16": "safetensors", "bin": "memory",
                     "gguf": "gguf"}


# GSQ's stages on the safetensors sources; GPTQ on every kind of source
@pytest.mark.parametrize("kind, method", [("fp32", "gptq"), ("bf16", "gptq"), ("gguf", "gptq"),
                                          ("bin", "gptq"), ("fp32", "gsq"), ("bf16", "gsq")])
def test_streamed_codes_equal_in_memory_codes(sources, calib, tmp_path, kind, method):
    cfg = _cfg(method)
    streamed = quantize(sources[kind], cfg, calib=str(calib), out=tmp_path / "q", progress=False)
    model, tokenizer = load_any_model(sources[kind])
    records, _ = quantize_model(model, tokenizer, cfg, calibration_tokens(tokenizer, str(calib)),
                                torch.device("cpu"), progress=False)
    assert sorted(streamed.records) == sorted(records)
    assert all(name.startswith("model.layers.0.") for name in records)
    for name, qw in records.items():
        assert torch.equal(streamed.records[name].codes, qw.codes), name
        assert torch.equal(streamed.records[name].scale, qw.scale), name
    got, want = streamed.model.state_dict(), model.state_dict()  # load_quantized: exact s·codes
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def _stored(path) -> dict[str, torch.Tensor]:
    out = {}
    for name, file in checkpoint_files(path).items():
        with safe_open(str(file), "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def test_output_keeps_the_source_dtype_and_values(sources, calib, tmp_path):
    result = quantize(sources["bf16"], _cfg("gptq"), calib=str(calib), out=tmp_path / "q",
                      progress=False)
    source, output = _stored(sources["bf16"]), _stored(tmp_path / "q")
    assert sorted(output) == sorted(source)
    assert (tmp_path / "q" / INDEX_FILE).is_file()
    assert not (tmp_path / "q.partial").exists()
    for name, value in source.items():
        assert output[name].dtype == torch.bfloat16, name
        qw = result.records.get(name.removesuffix(".weight"))
        want = value if qw is None else qw.dequantize(torch.bfloat16)
        assert torch.equal(output[name], want), name
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["LlamaForCausalLM"]


def test_only_the_current_block_is_loaded(sources, tmp_path):
    streamed = open_model(sources["bf16"])
    model, adapter = streamed.model, adapter_for("llama")
    loader = StreamedBlocks(model, adapter, streamed.source)

    def real() -> set[str]:
        return {n for n, p in model.named_parameters() if p.device.type != "meta"}

    assert real() == set()
    loader.load_embeddings(model, adapter, torch.device("cpu"))
    assert real() == {"model.embed_tokens.weight"}
    loader.release_embeddings(model, adapter)
    block = adapter.blocks(model)[1]
    loader.load(1, block, torch.device("cpu"))
    assert real() == {f"model.layers.1.{n}" for n, _ in block.named_parameters()}
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in block.parameters())
    loader.release(1, block)
    assert real() == set()
