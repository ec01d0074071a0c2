"""GGUF file export checked by llama.cpp itself (llama-cpp-python).

A tiny random Llama is quantized with RTN at mixed grids (4-, 3-, 2-bit, ternary; g32..g128), saved
as a gsq directory and exported. Every quantized tensor must read back bit-exactly, and llama.cpp's
per-token logits must agree with gsq's own dequantized transformers model; the same file without the
q/k row permutation, or with swapped nibbles, must not. The q/k weights are scaled up so attention
is peaked and a wrong rotary layout shows in the logits.

Tests that need llama_cpp fail (not skip) when it is missing: CI installs it with `.[dev]`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gsq.errors import GSQError
from gsq.export import gguf_file, gguf_tokenizer
from gsq.export.gguf_blocks import default_type
from gsq.export.gguf_file import export_gguf, write_base_gguf
from gsq.gguf import (
    decode_weight,
    field_value,
    gguf_type,
    model_hparams,
    permute_rows,
    qk_heads,
    read_gguf,
    tensor_name,
)
from gsq.io.quantized_dir import save_quantized
from gsq.models.quantized import apply_records
from gsq.quant.rtn import rtn_quantize
from gsq.quant.types import QuantSpec

SPECS = {"self_attn.q_proj": QuantSpec(4, 32), "self_attn.k_proj": QuantSpec(4, 32),
         "self_attn.v_proj": QuantSpec(3, 32), "self_attn.o_proj": QuantSpec(4, 64),
         "mlp.gate_proj": QuantSpec(2, 64), "mlp.up_proj": QuantSpec("ternary", 64),
         "mlp.down_proj": QuantSpec(2, 128)}
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
          ("Ġ", "1"), ("1", "2"), ("Ġ", "Ġ")]
PROBE = "The cat's 12 hats,  123 times!\n\n  naïve café — ok?\tthe end 2024."
SEQLEN, MAX_TOKENS = 128, 1024


def build_bpe_tokenizer(pre: str = "gpt-2"):
    """Byte-level BPE: 256 byte tokens, a few merges, one special token (<|endoftext|>).

    pre: 'gpt-2' (ByteLevel regex), 'smollm' (digits split first, as SmolLM2's tokenizer) or
    'llama-bpe' (Llama-3's split regex, whole-word vocabulary hits before merges)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    vocab.setdefault("Ġhats", len(vocab))  # no merge path: only ignore_merges finds it
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    steps = {"gpt-2": [byte_level],
             "smollm": [pre_tokenizers.Digits(individual_digits=True), byte_level],
             "llama-bpe": [pre_tokenizers.Split(Regex(gguf_tokenizer._LLAMA3_REGEX), "isolated"),
                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]}
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps[pre]) if pre != "gpt-2" else byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")


def build_quantized_dir(path: Path, tiny_llama, tokenizer, qk_gain: float = 8.0,
                        model_source: str = "tiny", vocab: int | None = None):
    """Quantize every block linear of a tiny Llama with RTN (grids of SPECS) and save a gsq
    directory at `path`. Returns (model with the dequantized weights, records)."""
    model = tiny_llama(0, vocab_size=vocab or len(tokenizer))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_gain)
            layer.self_attn.k_proj.weight.mul_(qk_gain)
    records = {f"model.layers.{i}.{name}": rtn_quantize(
        model.get_submodule(f"model.layers.{i}.{name}").weight, spec)
        for i in range(len(model.model.layers)) for name, spec in SPECS.items()}
    apply_records(model, records)
    save_quantized(path, model, tokenizer, records, {"method": "rtn"}, {"model": model_source})
    return model, records


def eval_tokens(tokenizer) -> torch.Tensor:
    from gsq.data.calibration import bundled_text_path, read_text, tokenize_text

    return tokenize_text(tokenizer, read_text(bundled_text_path())[20_000:40_000])


@pytest.fixture(scope="module")
def qdir(tmp_path_factory, tiny_llama):
    tokenizer = build_bpe_tokenizer()
    path = tmp_path_factory.mktemp("gguf") / "q"
    model, records = build_quantized_dir(path, tiny_llama, tokenizer)
    return path, model, records, tokenizer


@pytest.fixture(scope="module")
def exported(qdir):
    path = qdir[0].parent / "q.gguf"
    return path, export_gguf(qdir[0], path)


@pytest.fixture(scope="module")
def agreement(llama_cpp, qdir, exported):
    """llama.cpp on the exported file vs gsq's transformers model, same windows."""
    from gsq.eval.llamacpp import llamacpp_compare

    _, model, _, tokenizer = qdir
    return llamacpp_compare(exported[0], model, eval_tokens(tokenizer), SEQLEN, MAX_TOKENS,
                            progress=False)


def expected_weight(name: str, qw, hp) -> np.ndarray:
    """s·c in the row order llama.cpp expects."""
    weight = qw.dequantize()
    heads = qk_heads(tensor_name(f"{name}.weight", hp), hp)
    return (permute_rows(weight, heads) if heads else weight).numpy()


def tensors_by_name(path) -> dict:
    return {t.name: t for t in read_gguf(path)[1]}


# --------------------------------------------------------------------------------------------
# The file


def test_report_types_size_and_bpw(qdir, exported):
    path, report = exported
    _, _, records, _ = qdir
    assert report["file_bytes"] == path.stat().st_size
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".q.gguf.tmp-")]
    # 2 blocks x (7 linears + 2 norms) + token_embd + output_norm + output (untied)
    assert report["tensors"] == 21 == sum(report["tensor_types"].values())
    want = {}
    for qw in records.values():
        want[default_type(qw)] = want.get(default_type(qw), 0) + 1
    assert report["quantized_types"] == want
    assert report["tensor_types"]["F32"] == 5 and report["tensor_types"]["F16"] == 2
    bits = sum(gguf_type(default_type(qw)).bpw * qw.codes.numel() for qw in records.values())
    numel = sum(qw.codes.numel() for qw in records.values())
    assert report["quantized_bpw"] == pytest.approx(bits / numel)
    assert report["tokenizer"] == "converted from the HF tokenizer" and report["inexact"] == {}


def test_every_quantized_tensor_reads_back_bit_exactly(qdir, exported):
    _, model, records, _ = qdir
    hp = model_hparams(model.config)
    tensors = tensors_by_name(exported[0])
    for name, qw in records.items():
        t = tensors[tensor_name(f"{name}.weight", hp)]
        assert t.type_name == default_type(qw) and t.shape == qw.shape, name
        decoded = decode_weight(t.type_name, t.data, qw.shape[1])
        assert np.array_equal(decoded, expected_weight(name, qw, hp)), name


def test_q_and_k_rows_are_permuted_codes_and_scales_together(qdir):
    """Permuting codes and scales = permuting the rows of s·c (the export's shortcut, B.3)."""
    _, model, records, _ = qdir
    qw = records["model.layers.0.self_attn.k_proj"]
    heads = model.config.num_key_value_heads
    moved = gguf_file.permute_record(qw, heads)
    assert torch.equal(moved.dequantize(), permute_rows(qw.dequantize(), heads))
    assert not torch.equal(moved.dequantize(), qw.dequantize())


def test_float_tensors_and_metadata(qdir, exported):
    _, model, _, _ = qdir
    fields, tensors = read_gguf(exported[0])
    by_name = {t.name: t for t in tensors}
    embd = by_name["token_embd.weight"]
    assert embd.type_name == "F16"
    assert np.array_equal(embd.data.view(np.float16).reshape(embd.shape),
                          model.model.embed_tokens.weight.numpy().astype(np.float16))
    norm = by_name["blk.1.ffn_norm.weight"]
    assert norm.type_name == "F32"
    assert np.array_equal(norm.data.view(np.float32).reshape(-1),
                          model.model.layers[1].post_attention_layernorm.weight.numpy())
    assert by_name["output.weight"].type_name == "F16"
    cfg = model.config
    want = {"general.architecture": "llama", "llama.block_count": cfg.num_hidden_layers,
            "llama.embedding_length": cfg.hidden_size,
            "llama.feed_forward_length": cfg.intermediate_size,
            "llama.attention.head_count_kv": cfg.num_key_value_heads,
            "llama.rope.dimension_count": cfg.hidden_size // cfg.num_attention_heads,
            "llama.vocab_size": cfg.vocab_size, "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2"}
    assert {key: field_value(fields[key]) for key in want} == want


# --------------------------------------------------------------------------------------------
# llama.cpp as the client


def test_llamacpp_logits_agree_with_gsq(agreement):
    assert agreement["windows"] == MAX_TOKENS // SEQLEN
    assert agreement["tokens"] == agreement["windows"] * (SEQLEN - 1)
    assert agreement["kl"] < 1e-4, agreement
    assert agreement["top1"] > 0.97, agreement
    assert agreement["ppl"] == pytest.approx(agreement["base_ppl"], rel=1e-3)


def test_llamacpp_perplexity_follows_the_gsq_protocol(llama_cpp, qdir, exported):
    from gsq.eval.llamacpp import llamacpp_perplexity
    from gsq.eval.perplexity import perplexity

    _, model, _, tokenizer = qdir
    tokens = eval_tokens(tokenizer)
    ours = perplexity(model, tokens, SEQLEN, MAX_TOKENS, progress=False)
    theirs = llamacpp_perplexity(exported[0], tokens, SEQLEN, MAX_TOKENS, progress=False)
    assert (theirs["tokens"], theirs["windows"]) == (ours["tokens"], ours["windows"])
    assert theirs["ppl"] == pytest.approx(ours["ppl"], rel=1e-3)


def test_negative_control_without_the_qk_permutation(llama_cpp, qdir, agreement, tmp_path,
                                                     monkeypatch):
    from gsq.eval.llamacpp import llamacpp_compare

    monkeypatch.setattr(gguf_file, "qk_heads", lambda name, hp: None)
    path = tmp_path / "noperm.gguf"
    export_gguf(qdir[0], path)
    bad = llamacpp_compare(path, qdir[1], eval_tokens(qdir[3]), SEQLEN, MAX_TOKENS,
                           progress=False)
    assert bad["kl"] > 100 * agreement["kl"] and bad["top1"] < 0.8, (bad, agreement)


def test_negative_control_with_swapped_nibbles(llama_cpp, qdir, agreement, tmp_path, monkeypatch):
    """Q4_0 bytes with their two nibbles swapped: read-back and llama.cpp both notice."""
    from gsq.eval.llamacpp import llamacpp_compare
    real = gguf_file.encode_weight

    def swapped(qtype, qw, **kw):
        data = real(qtype, qw, **kw)
        if qtype == "Q4_0":
            blocks = data.reshape(data.shape[0], -1, 18).copy()
            blocks[:, :, 2:] = (blocks[:, :, 2:] >> 4) | (blocks[:, :, 2:] << 4)
            data = blocks.reshape(data.shape)
        return data

    monkeypatch.setattr(gguf_file, "encode_weight", swapped)
    path = tmp_path / "swapped.gguf"
    report = export_gguf(qdir[0], path)
    assert report["quantized_types"].get("Q4_0")
    _, model, records, tokenizer = qdir
    hp = model_hparams(model.config)
    name = "model.layers.0.self_attn.q_proj"
    t = tensors_by_name(path)[tensor_name(f"{name}.weight", hp)]
    assert t.type_name == "Q4_0"
    assert not np.array_equal(decode_weight("Q4_0", t.data, t.shape[1]),
                              expected_weight(name, records[name], hp))
    bad = llamacpp_compare(path, model, eval_tokens(tokenizer), SEQLEN, MAX_TOKENS,
                           progress=False)
    assert bad["kl"] > 100 * agreement["kl"] and bad["top1"] < 0.9, (bad, agreement)


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
def test_base_gguf_and_converted_tokenizer_match_transformers(llama_cpp, tiny_llama, tmp_path,
                                                              pre):
    """write_base_gguf of an HF folder: llama.cpp tokenizes like the HF tokenizer, and its F32
    logits equal the transformers model's."""
    from gsq.eval.llamacpp import LlamaCppModel, gguf_hf_tokenizer

    tokenizer = build_bpe_tokenizer(pre)
    model = tiny_llama(1, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    report = write_base_gguf(str(tmp_path / "hf"), tmp_path / "base.gguf", float_type="F32")
    assert report["tensor_types"] == {"F32": 21} and report["quantized_bpw"] is None
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(PROBE.encode())  # merges applied
    llm = LlamaCppModel(tmp_path / "base.gguf", n_ctx=64)
    assert llm.tokenize(PROBE) == ids
    # transformers' own GGUF tokenizer (gsq eval's default) ignores tokenizer.ggml.pre: it splits
    # like GPT-2, which differs from SmolLM's digit splitting on " 12" with these merges
    from_gguf = gguf_hf_tokenizer(tmp_path / "base.gguf")(PROBE, add_special_tokens=False)
    assert (from_gguf["input_ids"] == ids) == (pre == "gpt-2")
    logits = llm(torch.tensor([ids])).logits[0]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    assert torch.allclose(logits, want, atol=1e-3), (logits - want).abs().max()
    llm.close()


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


@pytest.mark.parametrize("spec, needle", [
    ({"model": {"type": "BPE", "byte_fallback": True}, "decoder": {"type": "Sequence"},
      "pre_tokenizer": {"type": "Metaspace"}}, "only byte-level BPE"),  # SentencePiece style
    ({"model": {"type": "Unigram"}, "decoder": {"type": "ByteLevel"}}, "only byte-level BPE"),
    ({"model": {"type": "BPE", "ignore_merges": True}, "decoder": {"type": "ByteLevel"},
      "pre_tokenizer": _BYTE_LEVEL}, "cannot name"),
    ({"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"},
      "pre_tokenizer": {**_BYTE_LEVEL, "add_prefix_space": True}}, "cannot name"),
    ({"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}, "normalizer": {"type": "NFC"},
      "pre_tokenizer": _BYTE_LEVEL}, "normalizer"),
])
def test_tokenizers_llamacpp_would_split_differently_are_refused(spec, needle):
    with pytest.raises(GSQError, match=needle):
        gguf_tokenizer.bpe_pre_name(spec)


@pytest.mark.slow
def test_tokenizer_is_copied_from_the_source_gguf(llama_cpp, tiny_llama, tmp_path):
    """A directory quantized from a .gguf file gets that file's tokenizer keys verbatim."""
    from gsq.eval.llamacpp import LlamaCppModel
    from gsq.models.loading import demo_model_path

    source = demo_model_path()
    source_fields, _ = read_gguf(source)
    n_vocab = len(source_fields["tokenizer.ggml.tokens"].data)
    build_quantized_dir(tmp_path / "q", tiny_llama, None, model_source=str(source),
                        vocab=n_vocab)
    report = export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    assert report["tokenizer"] == str(source)
    fields, _ = read_gguf(tmp_path / "q.gguf")
    for key, field in source_fields.items():
        if key.startswith("tokenizer."):
            assert field_value(fields[key]) == field_value(field), key
    ours = LlamaCppModel(tmp_path / "q.gguf", n_ctx=64)
    theirs = LlamaCppModel(source, n_ctx=64)
    assert ours.tokenize(PROBE) == theirs.tokenize(PROBE)


# --------------------------------------------------------------------------------------------
# Types, overrides, errors


def test_a_type_that_cannot_hold_a_tensor_is_refused_unless_lossy(llama_cpp, qdir, tmp_path):
    from gsq.eval.llamacpp import LlamaCppModel

    out = tmp_path / "q2.gguf"
    with pytest.raises(GSQError, match=r"q_proj.*Q2_0.*--lossy"):
        export_gguf(qdir[0], out, type_overrides={"*.q_proj": "Q2_0"})  # 4-bit codes
    assert not out.exists() and not list(tmp_path.iterdir())
    report = export_gguf(qdir[0], out, type_overrides={"*.q_proj": "Q2_0"}, lossy=True)
    assert sorted(report["inexact"]) == ["model.layers.0.self_attn.q_proj",
                                         "model.layers.1.self_attn.q_proj"]
    assert tensors_by_name(out)["blk.1.attn_q.weight"].type_name == "Q2_0"
    LlamaCppModel(out, n_ctx=16).close()


def test_a_type_whose_blocks_do_not_fit_the_rows_leaves_nothing(qdir, tmp_path):
    out = tmp_path / "k.gguf"
    with pytest.raises(GSQError, match="Q4_K"):
        export_gguf(qdir[0], out, type_overrides={"blk.0.attn_q": "Q4_K"}, lossy=True)  # 64 cols
    assert not list(tmp_path.iterdir())


def test_overrides_pick_types_by_module_hf_or_gguf_name(qdir, tmp_path):
    out = tmp_path / "o.gguf"
    report = export_gguf(qdir[0], out, float_type="BF16", type_overrides={
        "model.layers.0.mlp.*": "Q8_0", "blk.1.ffn_down.weight": "F32", "output": "F32"})
    tensors = tensors_by_name(out)
    assert {tensors[f"blk.0.ffn_{n}.weight"].type_name for n in ("gate", "up", "down")} == {"Q8_0"}
    assert tensors["blk.1.ffn_down.weight"].type_name == "F32"
    assert tensors["output.weight"].type_name == "F32"
    assert tensors["token_embd.weight"].type_name == "BF16"
    assert report["quantized_types"]["Q8_0"] == 3


def test_unquantized_embedding_converted_to_q8_0_by_the_reference_rounding(llama_cpp, qdir,
                                                                          tmp_path):
    """`--type token_embd=Q8_0` (as in llama.cpp's own files): the gguf package's Q8_0 rounding of
    the float table, reported as converted; llama.cpp runs the file."""
    import gguf

    from gsq.eval.llamacpp import llamacpp_perplexity

    out = tmp_path / "e.gguf"
    report = export_gguf(qdir[0], out, type_overrides={"token_embd": "Q8_0"})
    assert report["converted"] == {"model.embed_tokens": "Q8_0"}
    tensor = tensors_by_name(out)["token_embd.weight"]
    assert tensor.type_name == "Q8_0"
    table = qdir[1].model.embed_tokens.weight.detach().float().numpy()
    expected = gguf.quants.quantize(table, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(np.asarray(tensor.data).reshape(expected.shape), expected)
    decoded = gguf.quants.dequantize(expected, gguf.GGMLQuantizationType.Q8_0)
    assert np.abs(decoded - table).max() <= np.abs(table).max() / 127  # one Q8_0 step at most
    ppl = llamacpp_perplexity(out, eval_tokens(qdir[3]), SEQLEN, MAX_TOKENS, progress=False)
    assert np.isfinite(ppl["ppl"])


@pytest.mark.parametrize("overrides, needle", [
    ({"*.nothing_here": "Q4_0"}, "matches no tensor"),
    ({"model.embed_tokens": "Q2_K"}, "not quantized by gsq"),
    ({"*_norm*": "F16"}, "always stored as F32"),
    ({"*.q_proj": "Q5_9"}, "GGUF type must be one of"),
])
def test_bad_overrides(qdir, tmp_path, overrides, needle):
    with pytest.raises(GSQError, match=needle):
        export_gguf(qdir[0], tmp_path / "x.gguf", type_overrides=overrides)
    assert not list(tmp_path.iterdir())


def test_bad_float_type(qdir, tmp_path):
    with pytest.raises(GSQError, match="F32, F16, BF16"):
        export_gguf(qdir[0], tmp_path / "x.gguf", float_type="Q4_0")


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "gemma"}, "this model is 'gemma'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "rope scaling 'dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                          "attention_factor": 0.5}}, "yarn rope parameters attention_factor"),
    ({"attention_bias": True}, "biases"),
    ({"hidden_act": "gelu"}, "hidden_act 'silu'"),
])
def test_unsupported_architectures_are_refused(qdir, tmp_path, change, needle):
    copy = tmp_path / "q"
    shutil.copytree(qdir[0], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(GSQError, match=needle):
        export_gguf(copy, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_not_a_quantized_dir(tmp_path):
    with pytest.raises(GSQError, match="not a gsq quantized directory"):
        export_gguf(tmp_path, tmp_path / "x.gguf")


def test_out_exists_needs_overwrite(qdir, exported, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_text("keep me")
    with pytest.raises(GSQError, match="already exists"):
        export_gguf(qdir[0], out)
    assert out.read_text() == "keep me"
    export_gguf(qdir[0], out, overwrite=True)
    assert out.read_bytes() == exported[0].read_bytes()  # deterministic


def test_eval_refuses_truncated_or_corrupt_gguf(llama_cpp, exported, tmp_path):
    from gsq.eval.llamacpp import LlamaCppModel, llamacpp_perplexity

    data = exported[0].read_bytes()
    cases = {"truncated.gguf": data[: len(data) // 2], "header.gguf": data[:100],
             "garbage.gguf": b"GGUF" + bytes(range(256)) * 4, "text.gguf": b"not a model\n"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(GSQError, match="GGUF file"):
            LlamaCppModel(tmp_path / name, n_ctx=16)
    with pytest.raises(GSQError, match="does not exist"):
        llamacpp_perplexity(tmp_path / "missing.gguf", torch.arange(64), 16)


def test_token_ids_outside_the_vocabulary(llama_cpp, exported):
    from gsq.eval.llamacpp import LlamaCppModel

    llm = LlamaCppModel(exported[0], n_ctx=16)
    with pytest.raises(GSQError, match="outside the vocabulary"):
        llm(torch.tensor([[1, 2, 100_000]]))
    llm.close()


def test_quantize_with_llamacpp(llama_cpp, qdir, exported, tmp_path):
    from gsq.eval.llamacpp import quantize_with_llamacpp

    base = tmp_path / "base.gguf"
    write_base_gguf(str(qdir[0]), base)  # a gsq directory is a plain HF checkpoint too
    report = quantize_with_llamacpp(base, tmp_path / "q8.gguf", "Q8_0")
    assert report["tensor_types"] == {"F32": 5, "Q8_0": 16}
    assert report["file_bytes"] == (tmp_path / "q8.gguf").stat().st_size
    with pytest.raises(GSQError, match="no quantization type 'Q9_X'"):
        quantize_with_llamacpp(base, tmp_path / "bad.gguf", "Q9_X")
    with pytest.raises(GSQError, match="already exists"):
        quantize_with_llamacpp(base, tmp_path / "q8.gguf", "Q8_0")
    with pytest.raises(GSQError, match="could not quantize"):  # input already quantized
        quantize_with_llamacpp(exported[0], tmp_path / "re.gguf", "Q4_0")
    assert not (tmp_path / "re.gguf").exists() and not (tmp_path / "bad.gguf").exists()


def absmax_record(weight: torch.Tensor, spec: QuantSpec):
    """Fast RTN with fp16 scales: 4-bit s = absmax/7; 2-bit s = -m/2 for the signed value m of
    largest magnitude (so m is code -2, and groups of either sign use the mirrored grid)."""
    from gsq.quant.types import QuantizedWeight

    w = weight.reshape(weight.shape[0], -1, spec.group_size)
    if spec.bits == 2:
        m = torch.gather(w, -1, w.abs().argmax(-1, keepdim=True))[..., 0]
        scale = -m.sign() * (m.abs() / 2).clamp_min(1e-4)
    else:
        scale = (w.abs().amax(-1) / spec.qmax).clamp_min(1e-4)
    scale = scale.half().float()
    codes = (w / scale[..., None]).round().clamp(spec.qmin, spec.qmax).to(torch.int8)
    return QuantizedWeight(codes.reshape(weight.shape), scale, spec)


@pytest.mark.slow
def test_smollm2_export_agrees_with_gsq_in_llamacpp(llama_cpp, tmp_path):
    """The real model (9 heads, 3 kv heads, tied embeddings, tokenizer copied from the demo GGUF):
    every linear 4-bit g32 (Q4_0) except the MLPs of blocks 2, 10, 20 at 2-bit g64 (Q2_0).
    llama.cpp and gsq agree up to llama.cpp's 8-bit activation rounding."""
    from gsq.api import load_any_model
    from gsq.eval.llamacpp import llamacpp_compare

    model, tokenizer = load_any_model("smollm2-demo")
    two_bit = tuple(f"model.layers.{i}.mlp." for i in (2, 10, 20))
    records = {name: absmax_record(module.weight, QuantSpec(2, 64) if name.startswith(two_bit)
                                   else QuantSpec(4, 32))
               for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in name}
    apply_records(model, records)
    save_quantized(tmp_path / "q", model, tokenizer, records, {"method": "absmax"},
                   {"model": "smollm2-demo"})
    report = export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    assert report["quantized_types"] == {"Q2_0": 9, "Q4_0": 201}
    assert "output.weight" not in tensors_by_name(tmp_path / "q.gguf")  # tied
    result = llamacpp_compare(tmp_path / "q.gguf", model, eval_tokens(tokenizer), 256, 512,
                              progress=False)
    assert result["kl"] < 0.01 and result["top1"] > 0.9, result  # seen: 4.3e-3, 0.947
    assert result["ppl"] == pytest.approx(result["base_ppl"], rel=0.02), result
