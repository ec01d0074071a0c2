"""Loading a Q2_0 GGUF file (a type transformers' GGUF reader lacks) with gsq's own decoders.

A tiny random Llama, with tied and with untied embeddings, has every block linear quantized with
RTN at 2-bit g64 and is exported by gsq to a GGUF file (Q2_0 linears, F32 everything else). Loaded
back through `load_base_model`, every parameter must equal gsq's own dequantized value bit for bit,
the logits must equal those of the quantized directory's model, and llama.cpp must give the same
perplexity on the file. Files of another architecture, or truncated / incomplete ones, give a
one-line GSQError. The q/k weights are scaled up so attention is peaked and a wrong rotary row order
would show in the logits.

Tests that need llama_cpp fail (not skip) when it is missing: CI installs it with `.[dev]`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gsq.api import load_any_model
from gsq.errors import GSQError
from gsq.export.gguf_file import export_gguf
from gsq.gguf import field_value, read_gguf
from gsq.io.quantized_dir import save_quantized
from gsq.models.loading import load_base_model
from gsq.models.quantized import apply_records
from gsq.quant.rtn import rtn_quantize
from gsq.quant.types import QuantSpec

SPEC = QuantSpec(2, 64)
SEQLEN, MAX_TOKENS = 64, 512


def _eval_tokens(tokenizer) -> torch.Tensor:
    from gsq.data.calibration import bundled_text_path, read_text, tokenize_text

    return tokenize_text(tokenizer, read_text(bundled_text_path())[20_000:26_000])


def _build(root: Path, tiny_llama, tokenizer, tied: bool) -> dict:
    """Quantize a tiny Llama (2-bit g64 RTN, q/k scaled up), save the gsq directory and export it
    to a GGUF file with F32 float tensors (so the file holds every value exactly)."""
    model = tiny_llama(0, vocab_size=len(tokenizer), tie_word_embeddings=tied)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    records = {name: rtn_quantize(module.weight, SPEC) for name, module in model.named_modules()
               if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear)}
    apply_records(model, records)
    save_quantized(root / "q", model, tokenizer, records, {"method": "rtn"}, {"model": "tiny"})
    report = export_gguf(root / "q", root / "q.gguf", float_type="F32")
    return {"model": model, "qdir": root / "q", "gguf": root / "q.gguf", "report": report,
            "tokenizer": tokenizer}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def built(request, tmp_path_factory, tiny_llama, build_byte_bpe_tokenizer) -> dict:
    root = tmp_path_factory.mktemp("gguf-decoded")
    return _build(root, tiny_llama, build_byte_bpe_tokenizer(), request.param)


@pytest.fixture(scope="module")
def loaded(built):
    return load_base_model(built["gguf"])


def _rewrite(src: Path, dst: Path, arch: str | None = None, drop: str | None = None) -> Path:
    """A copy of a GGUF file with another general.architecture and/or one tensor left out."""
    from gguf import GGUFValueType, GGUFWriter

    from gsq.gguf import type_id

    fields, tensors = read_gguf(src)
    writer = GGUFWriter(dst, arch or field_value(fields["general.architecture"]))
    for key, field in fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field_value(field), field.types[0], sub_type=sub)
    kept = [t for t in tensors if t.name != drop]
    for t in kept:
        writer.add_tensor_info(t.name, list(t.shape), np.dtype(np.int8), t.data.nbytes,
                               raw_dtype=type_id(t.type_name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(np.array(t.data))
    writer.close()
    return dst


# --------------------------------------------------------------------------------------------
# The decoded model is gsq's model


def test_the_file_holds_q2_0_linears(built):
    assert built["report"]["quantized_types"] == {"Q2_0": 14}
    names = {t.name for t in read_gguf(built["gguf"])[1]}
    assert ("output.weight" in names) != built["model"].config.tie_word_embeddings


def test_every_parameter_equals_gsq_dequantized_values(built, loaded):
    model, _ = loaded
    want = built["model"].state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], value), name


def test_config_tokenizer_and_mode(built, loaded):
    model, tokenizer = loaded
    tied = built["model"].config.tie_word_embeddings
    assert model.config.tie_word_embeddings == tied
    same = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert same == tied
    assert model.config.vocab_size == len(built["tokenizer"]) == model.lm_head.weight.shape[0]
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    assert not hasattr(model.config, "quantization_config")
    probe = "the cat sat on the mat, 12 times"
    assert tokenizer(probe, add_special_tokens=False)["input_ids"] == \
        built["tokenizer"](probe, add_special_tokens=False)["input_ids"]


def test_logits_equal_the_quantized_directory_model(built, loaded):
    model, _ = loaded
    reference, _ = load_any_model(str(built["qdir"]))
    ids = _eval_tokens(built["tokenizer"])[:SEQLEN].unsqueeze(0)
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_load_in_bfloat16(built):
    model, _ = load_any_model(str(built["gguf"]), dtype=torch.bfloat16)
    want = built["model"].state_dict()
    for name, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, want[name].bfloat16()), name


def test_llamacpp_perplexity_matches_the_decoded_model(llama_cpp, built, loaded):
    from gsq.eval.llamacpp import llamacpp_perplexity
    from gsq.eval.perplexity import perplexity

    model, tokenizer = loaded
    tokens = _eval_tokens(tokenizer)
    ours = perplexity(model, tokens, SEQLEN, MAX_TOKENS, progress=False)
    theirs = llamacpp_perplexity(built["gguf"], tokens, SEQLEN, MAX_TOKENS, progress=False)
    assert (theirs["tokens"], theirs["windows"]) == (ours["tokens"], ours["windows"])
    assert theirs["ppl"] == pytest.approx(ours["ppl"], rel=1e-3)


# --------------------------------------------------------------------------------------------
# Errors


def test_another_architecture_is_refused(built, tmp_path):
    path = _rewrite(built["gguf"], tmp_path / "gemma.gguf", arch="gemma2")
    with pytest.raises(GSQError, match=r"architecture 'gemma2' and Q2_0 tensors.*only for the "
                                       r"llama, qwen2, qwen3, qwen3moe architectures"):
        load_base_model(path)


def test_keys_of_another_architecture_are_refused(built, tmp_path):
    """A llama file relabelled qwen2 has no qwen2.* keys: refused, not read as a Qwen2."""
    path = _rewrite(built["gguf"], tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(GSQError, match=r"has no key 'qwen2\.attention\.head_count'"):
        load_base_model(path)


def test_a_missing_tensor_is_named(built, tmp_path):
    path = _rewrite(built["gguf"], tmp_path / "missing.gguf", drop="blk.1.ffn_down.weight")
    with pytest.raises(GSQError, match=r"no tensor 'blk.1.ffn_down.weight'"):
        load_base_model(path)


def test_a_truncated_file_is_refused(built, tmp_path):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(built["gguf"].read_bytes()[:-1000])
    with pytest.raises(GSQError, match=r"cannot read GGUF file .*truncated"):
        load_base_model(path)
