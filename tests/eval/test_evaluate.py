"""`gsq.eval.evaluate`, the one evaluation of the CLI, the demo and the benchmarks: the same
numbers as the metric functions it calls, for a model in memory and for a saved one."""

from __future__ import annotations

import pytest
import torch

from gsq import evaluate
from gsq.errors import GSQError
from gsq.eval.kl import compare_with_base
from gsq.eval.perplexity import perplexity


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(3))


def test_in_memory_model_on_tokens(tiny_llama, tokens):
    model, base = tiny_llama(1), tiny_llama(0)
    assert evaluate(model, tokens, seqlen=64, progress=False) == perplexity(
        model, tokens, 64, progress=False)
    got = evaluate(model, tokens, base=base, seqlen=64, max_tokens=320, progress=False)
    assert got == compare_with_base(model, base, tokens, 64, 320, progress=False)
    assert got["kl"] > 0 and got["windows"] == 5


def test_saved_model_and_text_file(tiny_llama_dir, byte_tokenizer, tiny_llama, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    ids = byte_tokenizer(text.read_text(), add_special_tokens=False,
                         return_tensors="pt")["input_ids"][0]
    got = evaluate(str(tiny_llama_dir), text, base=str(tiny_llama_dir), seqlen=64,
                   progress=False)
    assert got["kl"] == pytest.approx(0.0, abs=1e-9) and got["top1"] == 1.0
    same = evaluate(tiny_llama(0), text, tokenizer=byte_tokenizer, seqlen=64, progress=False)
    assert same == perplexity(tiny_llama(0), ids, 64, progress=False)
    # the KL pass computes the perplexity in its own chunks: equal up to float rounding
    assert got["ppl"] == pytest.approx(same["ppl"], rel=1e-6)


def test_refusals(tiny_llama, tiny_llama_dir, tmp_path):
    with pytest.raises(GSQError, match="needs its tokenizer"):
        evaluate(tiny_llama(0), tmp_path / "eval.txt")
    with pytest.raises(GSQError, match="needs a .gguf model file"):
        evaluate(str(tiny_llama_dir), tmp_path / "eval.txt", engine="llama.cpp")
    with pytest.raises(GSQError, match="llama.cpp engine only"):
        evaluate(str(tiny_llama_dir), tmp_path / "eval.txt", tokenizer="x")
    with pytest.raises(GSQError, match="numerics must be one of"):
        evaluate(str(tiny_llama_dir), tmp_path / "eval.txt", numerics="fast")
    with pytest.raises(GSQError, match="dtype must be one of"):
        evaluate(str(tiny_llama_dir), tmp_path / "eval.txt", dtype="float16")


def test_bf16_loads_model_and_base_in_bf16(tiny_llama_dir, tmp_path, monkeypatch):
    """--dtype bfloat16: the model and the base are loaded in bf16 (half the memory), and the
    result stays close to the exact fp32 evaluation."""
    import gsq.models.loading as loading

    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    exact = evaluate(str(tiny_llama_dir), text, base=str(tiny_llama_dir), seqlen=64,
                     progress=False)
    loaded, real = [], loading.load_any_model

    def spy(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        loaded.append({p.dtype for p in model.parameters()})
        return model, tok

    monkeypatch.setattr(loading, "load_any_model", spy)
    half = evaluate(str(tiny_llama_dir), text, base=str(tiny_llama_dir), seqlen=64,
                    progress=False, dtype="bfloat16")
    assert loaded == [{torch.bfloat16}, {torch.bfloat16}]
    assert half["ppl"] == pytest.approx(exact["ppl"], rel=0.02) and half["ppl"] != exact["ppl"]
    assert half["kl"] == pytest.approx(0.0, abs=1e-9)  # the same bf16 model on both sides
