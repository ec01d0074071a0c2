"""Every dense architecture gsq supports, tested end to end on tiny random models.

Layouts (gsq.models.synthetic): Llama untied and tied, Llama-3 rope (llama3), linear and yarn rope
scaling, Mistral (also with a sliding window shorter than the sequences), Qwen2 (q/k/v biases) and
Qwen3 (q/k norms, explicit head_dim). For each:
  * the adapter finds every linear of a block exactly once, and its block-wise forward equals
    transformers' decoder layers (rope, masks, biases and q/k norms included);
  * `gsq.api.quantize` from a saved checkpoint with the real SmolLM2 tokenizer, with rtn, gptq and
    gsq (tiny budgets), quantizes the 7 linears of every block and nothing else: biases, norms and
    embeddings stay those of the checkpoint, tied embeddings stay tied;
  * the quantized directory reads back the same through `load_quantized` and plain transformers,
    and its compressed-tensors export loads in transformers with the logits of gsq's own
    dequantized model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gsq.calib.capture import capture_block_context
from gsq.models.registry import adapter_for
from gsq.models.synthetic import build_random_model, random_config

ROPE_LINEAR = {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}
# case -> (synthetic architecture, config overrides)
CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama-tied", {}),
    "llama3": ("llama3", {}),
    "llama-linear": ("llama", ROPE_LINEAR),
    "llama-yarn": ("llama-yarn", {}),
    "mistral": ("mistral", {}),
    "mistral-sliding": ("mistral", {"sliding_window": 8}),  # shorter than every sequence below
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}
# Each distinct module layout (Llama, Qwen2 with biases, Qwen3 with q/k norms) with every method;
# the variants (Mistral's class, rope, tying, window) with gsq, the method whose stage objectives
# run attention with the captured rope and mask.
RUNS = [(case, method) for case in ("llama", "qwen2", "qwen3") for method in ("rtn", "gptq", "gsq")]
RUNS += [(case, "gsq") for case in ("mistral", "mistral-sliding", "llama-tied", "llama3",
                                    "llama-linear", "llama-yarn")]
SEQLEN = 32


def _tiny(case: str, vocab: int = 256):
    arch, overrides = CASES[case]
    return build_random_model(random_config(arch, vocab, **overrides), seed=0)


@pytest.mark.parametrize("case", list(CASES))
def test_stages_cover_every_linear_once(case):
    model = _tiny(case)
    adapter = adapter_for(model.config.model_type)
    names = adapter.linear_names()
    assert len(names) == len(set(names))
    for block in adapter.blocks(model):
        linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        assert linears == set(names)


@pytest.mark.parametrize("case", list(CASES))
def test_block_forward_matches_the_decoder_layers(case):
    model = _tiny(case)
    adapter = adapter_for(model.config.model_type)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        ctx = capture_block_context(model, adapter, ids.shape[1], torch.device("cpu"))
        h = hidden[0]
        for i, block in enumerate(adapter.blocks(model)):
            h = adapter.block_forward(block, h, ctx)
            if i < len(hidden) - 2:  # the last hidden state is after the final norm
                torch.testing.assert_close(h, hidden[i + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.model.norm(h), hidden[-1], rtol=1e-5, atol=1e-5)


def test_the_variants_change_the_model():
    """The block-forward checks above would not notice a variant that changes nothing."""
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        logits = {case: _tiny(case)(input_ids=ids).logits for case in CASES}
    for case in ("llama3", "llama-linear", "llama-yarn"):
        assert not torch.allclose(logits[case], logits["llama"], atol=1e-4), case
    assert not torch.allclose(logits["mistral-sliding"], logits["mistral"], atol=1e-4)
    early = slice(0, 8)  # within the window every position sees the same keys
    torch.testing.assert_close(logits["mistral-sliding"][:, early], logits["mistral"][:, early])


# ---------------------------------------------------------------------------------------------
# quantize -> load_quantized / compressed-tensors


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    from gsq.data import calibration

    book = Path(calibration.__file__).parent / "bundled" / "pg1342.txt"
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(book.read_text(encoding="utf-8")[20_000:40_000])
    return path


@pytest.fixture(scope="module")
def quantized(arch_model_dir, calib_file, tmp_path_factory):
    """Factory (case, method) -> (source dir, QuantizeResult); cached."""
    from gsq.api import quantize
    from gsq.config import QuantizeConfig
    from gsq.quant.trainer import TrainConfig

    cfg = QuantizeConfig(bits=2, group_size=64, nsamples=4, val_samples=2, gptq_samples=4,
                         seqlen=SEQLEN, qk_steps=2,
                         train=TrainConfig(epochs=1, batch_size=2, micro_batch_size=2))
    cache = {}

    def make(case: str, method: str):
        if (case, method) not in cache:
            arch, overrides = CASES[case]
            source = arch_model_dir(arch, **overrides)
            out = tmp_path_factory.mktemp(f"q-{case}-{method}") / "q"
            result = quantize(str(source), cfg.replace(method=method), calib=str(calib_file),
                              out=out, progress=False)
            cache[case, method] = source, result
        return cache[case, method]

    return make


def _load_source(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize(("case", "method"), RUNS)
def test_quantize_quantizes_the_linears_only_and_round_trips(quantized, case, method):
    """The directory read back two ways: by gsq (`load_quantized`: exact s·codes from the codes
    file) and as a plain transformers checkpoint; both hold s·codes in the 7 linears of every
    block and the source checkpoint's values everywhere else."""
    from gsq.models.quantized import load_quantized

    source_dir, result = quantized(case, method)
    source = _load_source(source_dir)
    adapter = adapter_for(source.config.model_type)
    expected = {f"model.layers.{i}.{n}" for i in range(2) for n in adapter.linear_names()}
    model, _, records = load_quantized(result.out)
    assert set(records) == expected and result.report["quantized_tensors"] == len(expected)
    base = dict(source.named_parameters())
    plain = dict(_load_source(result.out).named_parameters())
    assert set(plain) == set(base)
    for name, param in model.named_parameters():
        module = name.rpartition(".")[0]
        if module in records and name.endswith(".weight"):
            assert torch.equal(param, records[module].dequantize(param.dtype)), name
            assert not torch.equal(param, base[name]), name
        else:  # biases, norms (q/k norms too), embeddings, lm_head: the checkpoint's values
            assert torch.equal(param, base[name]), name
        assert torch.equal(plain[name], param), name  # s·codes is exact in bf16 at 2 bits
    tied = source.config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("case", [case for case, method in RUNS if method == "gsq"])
def test_compressed_tensors_export_loads_with_gsqs_logits(quantized, case, tmp_path):
    from transformers import AutoModelForCausalLM

    from gsq.export.compressed_tensors import export_compressed_tensors
    from gsq.models.quantized import load_quantized

    _, result = quantized(case, "gsq")
    export_compressed_tensors(result.out, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    reference, _, _ = load_quantized(result.out)  # gsq's own dequantized model
    ids = torch.randint(0, reference.config.vocab_size, (2, SEQLEN),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    if case == "qwen2":  # the biases travel as plain tensors beside the packed weights
        attn = loaded.model.layers[1].self_attn
        assert torch.equal(attn.k_proj.bias, reference.model.layers[1].self_attn.k_proj.bias)
