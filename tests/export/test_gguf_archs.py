"""GGUF export for every architecture gsq writes, read back by gsq and run by llama.cpp.

Each architecture's tiny random model (gsq.models.synthetic: 2 blocks, SmolLM2's tokenizer) is made
peaked where a broken layout would otherwise hide: the final norm is scaled (peaked logits) and so
are the q/k projections, or Qwen3's q/k norms (peaked attention, so that a wrong rotary layout
shows). It is quantized with RTN (attention 4-bit, MLP 2-bit, g64; Mixtral by GPTQ with
`--target gguf:Q4_0`) and exported; the MoE models (qwen3_moe, mixtral: 4 experts, top-2) write
their experts as merged tensors. Per file:
  * the keys and tensors llama.cpp's loader for the architecture reads are there (biases, q/k
    norms, rope scaling keys or llama3's rope_freqs, merged expert tensors and routers, expert
    counts), with the types llama.cpp expects (norms, biases, routers F32);
  * gsq reads the file back into the model it came from (config and parameters);
  * llama.cpp's perplexity on a short text agrees within 0.5% with gsq's evaluation of the file
    under llama.cpp's numerics (what `gsq eval FILE.gguf --numerics llama.cpp` computes), and
    its logits are close (KL, top-1).
Negative controls: the same checks fail for a Qwen2 file written with Llama's q/k row order, for
a Llama-3 file without its rope_freqs and for a Mixtral file with its experts out of order.
Configs llama.cpp would run differently are refused.

Tests that need llama_cpp fail (not skip) when it is missing: CI installs it with `.[dev]`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gsq.errors import GSQError
from gsq.export import gguf_file
from gsq.export.gguf_file import export_gguf
from gsq.gguf import arch as gguf_arch
from gsq.gguf import field_value, read_gguf

SEQLEN, MAX_TOKENS = 64, 1024
LOGIT_SCALE, QK_GAIN, QK_NORM_GAIN = 20.0, 8.0, 3.0
DENSE = ("llama-tied", "llama3", "llama-yarn", "mistral", "qwen2", "qwen3")
MOE = ("qwen3_moe", "mixtral")
ARCHS = DENSE + MOE
# quantized another way than RTN at the default grids: Mixtral by GPTQ (per-expert Hessians)
# for `--target gguf:Q4_0`, so every linear, each expert's too, is Q4_0 in the file
TARGETED = {"mixtral": dict(target="Q4_0", method="gptq", bits_overrides=())}

# arch -> (general.architecture, keys with their values, tensors that must be there / absent)
EXPECT = {
    "llama-tied": ("llama", {"llama.attention.head_count_kv": 2}, {"blk.1.attn_q.weight"},
                   {"output.weight", "rope_freqs.weight"}),
    "llama3": ("llama", {}, {"rope_freqs.weight", "output.weight"}, {"blk.0.attn_q.bias"}),
    "llama-yarn": ("llama", {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                             "llama.rope.scaling.original_context_length": 64},
                   {"output.weight"}, {"rope_freqs.weight"}),
    "mistral": ("llama", {"llama.context_length": 256}, {"output.weight"}, set()),
    "qwen2": ("qwen2", {"qwen2.rope.freq_base": 10000.0},
              {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.1.attn_v.bias"},
              {"output.weight", "blk.0.attn_output.bias"}),
    "qwen3": ("qwen3", {"qwen3.attention.key_length": 32, "qwen3.attention.value_length": 32},
              {"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight", "output.weight"},
              {"blk.0.attn_q.bias"}),
    "qwen3_moe": ("qwen3moe", {"qwen3moe.expert_count": 4, "qwen3moe.expert_used_count": 2,
                               "qwen3moe.expert_feed_forward_length": 64},
                  {"blk.0.ffn_gate_inp.weight", "blk.1.ffn_gate_exps.weight",
                   "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight",
                   "blk.0.attn_q_norm.weight"},
                  {"blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"}),
    "mixtral": ("llama", {"llama.expert_count": 4, "llama.expert_used_count": 2,
                          "llama.feed_forward_length": 128},
                {"blk.0.ffn_gate_inp.weight", "blk.1.ffn_gate_exps.weight",
                 "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight", "output.weight"},
                {"blk.0.ffn_gate.weight", "rope_freqs.weight"}),
}


def _quantize(model_dir: Path, out: Path, calib: Path, target: str | None = None,
              **changes) -> Path:
    """RTN: attention 4-bit, MLP 2-bit, g64 (Q4_0 and Q2_0 in the file), unless `changes` or a
    GGUF `target` say otherwise."""
    from gsq.api import quantize
    from gsq.config import QuantizeConfig

    cfg = QuantizeConfig(method="rtn", bits=2, group_size=64, nsamples=2, val_samples=1,
                         gptq_samples=2, seqlen=SEQLEN,
                         bits_overrides=(("*.self_attn.*", 4),)).replace(**changes)
    if target:
        cfg = cfg.targeting(target)
    quantize(str(model_dir), cfg, calib=str(calib), out=out, progress=False)
    return out


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    from gsq.data.calibration import bundled_text_path, read_text

    root = tmp_path_factory.mktemp("arch-texts")
    text = read_text(bundled_text_path())
    (root / "calib.txt").write_text(text[10_000:16_000])
    (root / "eval.txt").write_text(text[40_000:52_000])
    return {"calib": root / "calib.txt", "eval": root / "eval.txt"}


def peaked_model_dir(arch: str, tokenizer, path: Path, vocab_size: int | None = None,
                     **overrides) -> Path:
    """A tiny random model of `arch` with peaked logits and attention, saved as a checkpoint (a
    vocabulary of `vocab_size`, else the tokenizer's)."""
    from gsq.models.synthetic import (
        build_random_model,
        peak_attention,
        random_config,
        save_random_model,
    )

    config = random_config(arch, vocab_size or len(tokenizer), **overrides)
    model = build_random_model(config, seed=0, logit_scale=LOGIT_SCALE)
    return save_random_model(peak_attention(model, QK_GAIN, QK_NORM_GAIN), tokenizer, path)


@pytest.fixture(scope="module")
def exported(demo_tok, texts, tmp_path_factory):
    """Factory: arch -> {'hf', 'qdir', 'gguf', 'report', 'fields', 'tensors', 'types'} (the
    file as `read_gguf` reads it; cached)."""
    cache: dict[str, dict] = {}

    def make(arch: str) -> dict:
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"gguf-{arch}")
            hf = peaked_model_dir(arch, demo_tok, root / "hf")
            qdir = _quantize(hf, root / "q", texts["calib"], **TARGETED.get(arch, {}))
            report = export_gguf(qdir, root / "q.gguf")
            fields, tensors = read_gguf(root / "q.gguf")
            cache[arch] = {"hf": hf, "qdir": qdir, "gguf": root / "q.gguf", "report": report,
                           "fields": fields, "types": {t.name: t.type_name for t in tensors},
                           "tensors": tensors}
        return cache[arch]

    return make


@pytest.fixture(scope="module")
def loaded(exported):
    """Factory: arch -> (model, tokenizer) read back from the GGUF file by gsq (cached)."""
    from gsq.models.loading import load_base_model

    cache: dict[str, tuple] = {}

    def make(arch: str) -> tuple:
        if arch not in cache:
            cache[arch] = load_base_model(exported(arch)["gguf"])
        return cache[arch]

    return make


def numerics_vs_llamacpp(path: Path, types: dict[str, str], model, tokenizer,
                         text: Path) -> dict:
    """llama.cpp on `path` against `model` computing with llama.cpp's numerics for the tensor
    types `types` (the computation of `gsq eval FILE.gguf --numerics llama.cpp`), same tokens."""
    from gsq.data.calibration import read_text, tokenize_text
    from gsq.eval.llamacpp import llamacpp_compare
    from gsq.eval.llamacpp_numerics import linear_roundings, llamacpp_numerics

    tokens = tokenize_text(tokenizer, read_text(text))
    with llamacpp_numerics(model, linear_roundings(model, types)):
        return llamacpp_compare(path, model, tokens, SEQLEN, MAX_TOKENS, progress=False)


# --------------------------------------------------------------------------------------------
# The files


@pytest.mark.parametrize("arch", ARCHS)
def test_the_file_has_what_llamacpp_loads(exported, arch):
    name, keys, present, absent = EXPECT[arch]
    fields, types = exported(arch)["fields"], exported(arch)["types"]
    assert field_value(fields["general.architecture"]) == name
    assert {k: field_value(fields[k]) for k in keys} == keys
    assert present <= set(types) and not absent & set(types), sorted(types)
    for tensor, qtype in types.items():
        if tensor.endswith(("_norm.weight", ".bias", "rope_freqs.weight", "ffn_gate_inp.weight")):
            assert qtype == "F32", tensor
        elif ".attn_" in tensor:
            assert qtype == "Q4_0", tensor
        elif ".ffn_" in tensor:
            assert qtype == ("Q4_0" if arch in TARGETED else "Q2_0"), tensor


def test_llama3_rope_freqs_are_llama_cpps_factors(exported):
    """rope_freqs holds the divisor per rotary frequency as llama.cpp's converter computes it:
    1 for short waves, `factor` for long ones, a blend between (the tiny model has all three)."""
    from gsq.gguf import decode_tensor

    freqs = next(t for t in exported("llama3")["tensors"] if t.name == "rope_freqs.weight")
    values = decode_tensor(freqs)
    assert values.shape == (8,) and values[0] == 1.0 and values[-1] == 8.0
    assert ((values > 1) & (values < 8)).sum() == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_gsq_reads_the_file_back_as_the_quantized_model(exported, loaded, arch):
    """Config as the source's (rope scaling, head_dim, experts, tied embeddings); every quantized
    linear (each expert's projection too, a slice of a merged tensor) bit-exact, every other
    tensor as F16/F32 stored it."""
    from gsq.api import load_any_model
    from gsq.io.quantized_dir import load_records
    from gsq.models.gguf_decoded import checkpoint_tensors

    model, _ = loaded(arch)
    reference, _ = load_any_model(str(exported(arch)["qdir"]))
    ours, theirs = model.config, reference.config
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "tie_word_embeddings", "vocab_size", "rms_norm_eps"):
        assert getattr(ours, key) == getattr(theirs, key), key
    for key in ("num_experts", "num_local_experts", "num_experts_per_tok",
                "moe_intermediate_size", "norm_topk_prob"):
        assert getattr(ours, key, None) == getattr(theirs, key, None), key
    assert ours.head_dim == (getattr(theirs, "head_dim", None)
                             or theirs.hidden_size // theirs.num_attention_heads)
    with torch.no_grad():
        rope = (model.model.rotary_emb.inv_freq, model.model.rotary_emb.attention_scaling)
        want = (reference.model.rotary_emb.inv_freq, reference.model.rotary_emb.attention_scaling)
    torch.testing.assert_close(rope[0], want[0], rtol=1e-6, atol=0)
    assert rope[1] == pytest.approx(want[1], rel=1e-6)
    records = load_records(exported(arch)["qdir"])
    state, want_state = checkpoint_tensors(model), checkpoint_tensors(reference)
    assert set(state) == set(want_state)
    assert any(".experts." in name for name in records) == (arch in MOE)
    for name, value in want_state.items():
        exact = value.dim() == 1 or name.removesuffix(".weight") in records  # else F16
        assert torch.equal(state[name], value if exact else value.half().float()), name


@pytest.mark.parametrize("arch", ARCHS)
def test_llamacpp_agrees_with_gsq_llamacpp_numerics(llama_cpp, exported, loaded, texts, arch):
    model, tokenizer = loaded(arch)
    result = numerics_vs_llamacpp(exported(arch)["gguf"], exported(arch)["types"], model,
                                  tokenizer, texts["eval"])
    assert result["tokens"] == MAX_TOKENS - MAX_TOKENS // SEQLEN
    assert result["ppl"] == pytest.approx(result["base_ppl"], rel=5e-3), result
    assert result["kl"] < 1e-2 and result["top1"] > 0.95, result


# --------------------------------------------------------------------------------------------
# Negative controls: the checks above notice a wrong layout


def _rewritten(exported, arch: str, tmp_path: Path, monkeypatch, patch) -> Path:
    """The architecture's file exported again with `patch(monkeypatch)` in force (the good file
    is made first, without it)."""
    qdir = exported(arch)["qdir"]
    with monkeypatch.context() as mp:
        patch(mp)
        out = tmp_path / f"{arch}-bad.gguf"
        export_gguf(qdir, out)
    return out


def test_qwen2_with_llamas_qk_row_order_disagrees(llama_cpp, exported, loaded, texts, tmp_path,
                                                  monkeypatch):
    def llama_rows(mp):
        entry = dataclasses.replace(gguf_arch.ARCHITECTURES["qwen2"], permute_qk=True)
        mp.setitem(gguf_arch.ARCHITECTURES, "qwen2", entry)

    bad = _rewritten(exported, "qwen2", tmp_path, monkeypatch, llama_rows)
    model, tokenizer = loaded("qwen2")
    result = numerics_vs_llamacpp(bad, exported("qwen2")["types"], model, tokenizer,
                                  texts["eval"])
    assert abs(result["ppl"] / result["base_ppl"] - 1) > 5e-3 and result["kl"] > 0.1, result


def test_llama3_without_rope_freqs_disagrees(llama_cpp, exported, loaded, texts, tmp_path,
                                             monkeypatch):
    def no_freqs(mp):
        mp.setattr(gguf_file, "extra_tensors", lambda hp: {})

    bad = _rewritten(exported, "llama3", tmp_path, monkeypatch, no_freqs)
    assert "rope_freqs.weight" not in {t.name for t in read_gguf(bad)[1]}
    model, tokenizer = loaded("llama3")
    result = numerics_vs_llamacpp(bad, exported("llama3")["types"], model, tokenizer,
                                  texts["eval"])
    assert abs(result["ppl"] / result["base_ppl"] - 1) > 5e-3 and result["kl"] > 0.1, result


def test_mixtral_with_experts_out_of_order_disagrees(llama_cpp, exported, loaded, texts,
                                                     tmp_path, monkeypatch):
    """Each merged expert tensor written with its experts in reverse order: llama.cpp runs
    the router's choices on the wrong experts, which the agreement check notices."""
    merge = gguf_file._merge_experts

    def reversed_experts(mp):
        mp.setattr(gguf_file, "_merge_experts", lambda name, parts: merge(
            name, {len(parts) - 1 - e: p for e, p in parts.items()}))

    bad = _rewritten(exported, "mixtral", tmp_path, monkeypatch, reversed_experts)
    model, tokenizer = loaded("mixtral")
    result = numerics_vs_llamacpp(bad, exported("mixtral")["types"], model, tokenizer,
                                  texts["eval"])
    # the tiny experts move the residual stream less than attention does: the KL is smaller
    # than in the controls above (the good file's is ~1e-6), still twice the agreement bound;
    # the perplexity, an average over confidently wrong predictions, moves by only ~0.5%
    assert result["kl"] > 2e-2 and result["top1"] < 0.95, result


# --------------------------------------------------------------------------------------------
# Refusals: configs llama.cpp would run differently


@pytest.mark.parametrize("arch, change, needle", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32}, "sliding-window"),
    ("qwen3", {"attention_bias": True}, "attention biases"),
    ("llama3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                    "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
     "rope scaling 'longrope'"),
    ("qwen3", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}},
     "rope scaling 'llama3' for 'qwen3'"),
    ("qwen2", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "no dense layers"),
    ("mixtral", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}},
     "rope scaling 'dynamic'"),
])
def test_configs_llamacpp_would_run_differently_are_refused(exported, tmp_path, arch, change,
                                                            needle):
    copy = tmp_path / "q"
    shutil.copytree(exported(arch)["qdir"], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(GSQError, match=needle):
        export_gguf(copy, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_mistral_sliding_window_caps_the_context(exported, tmp_path):
    """llama.cpp's llama architecture attends to the whole context: the file's context length
    is the window, within which both compute the same."""
    copy = tmp_path / "q"
    shutil.copytree(exported("mistral")["qdir"], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "sliding_window": 128}))
    export_gguf(copy, tmp_path / "x.gguf")
    fields, _ = read_gguf(tmp_path / "x.gguf")
    assert field_value(fields["llama.context_length"]) == 128


def test_llama3_rope_parameters_come_back_from_rope_freqs():
    """Real Llama 3.x settings are recovered exactly; the tiny model's (one blended frequency)
    by parameters that give the same divisors."""
    from gsq.gguf.arch import llama3_rope_factors, llama3_rope_params

    real = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    factors = llama3_rope_factors({**real, "rope_theta": 500000.0}, 64)
    assert llama3_rope_params(factors.astype(np.float64), 500000.0, 64) == real
    tiny = {**real, "factor": 8.0, "original_max_position_embeddings": 64}
    factors = llama3_rope_factors({**tiny, "rope_theta": 500000.0}, 16)
    back = llama3_rope_params(factors.astype(np.float64), 500000.0, 16)
    assert np.array_equal(llama3_rope_factors({**back, "rope_theta": 500000.0}, 16), factors)
    assert isinstance(back["original_max_position_embeddings"], int)
    with pytest.raises(GSQError, match="not a llama3 rope scaling"):
        llama3_rope_params(np.array([1.0, 3.0, 2.0, 8.0]), 500000.0, 8)


# --------------------------------------------------------------------------------------------
# --target gguf:TYPE and gsq refine on non-Llama architectures (widths of 256: K types apply)

WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def targeted(demo_tok, texts, tmp_path_factory) -> dict:
    """A wide Qwen3 quantized by GSQ (tiny budget) for `--target gguf:Q4_K`, and its file."""
    from gsq.quant.trainer import TrainConfig

    root = tmp_path_factory.mktemp("gguf-target")
    hf = peaked_model_dir("qwen3", demo_tok, root / "hf", head_dim=64, **WIDE)
    train = TrainConfig(epochs=1, batch_size=2, micro_batch_size=2)
    qdir = _quantize(hf, root / "q", texts["calib"], "Q4_K", method="gsq", bits_overrides=(),
                     qk_steps=4, train=train)
    return {"qdir": qdir, "gguf": root / "q.gguf", "report": export_gguf(qdir, root / "q.gguf")}


def test_target_q4_k_on_qwen3_is_written_and_run_as_evaluated(llama_cpp, targeted, texts):
    from gsq.models.loading import load_base_model

    assert targeted["report"]["quantized_types"] == {"Q4_K": 14}
    assert targeted["report"]["inexact"] == {}
    types = {t.name: t.type_name for t in read_gguf(targeted["gguf"])[1]}
    model, tokenizer = load_base_model(targeted["gguf"])
    result = numerics_vs_llamacpp(targeted["gguf"], types, model, tokenizer, texts["eval"])
    assert result["ppl"] == pytest.approx(result["base_ppl"], rel=5e-3), result
    assert result["kl"] < 1e-2 and result["top1"] > 0.95, result


@pytest.fixture(scope="module")
def refined(llama_cpp, demo_tok, texts, tmp_path_factory) -> dict:
    """A wide Qwen2 (biases, tied embeddings) quantized to Q2_K by llama.cpp's own quantizer
    from gsq's F16 base file, then refined by gsq (first block)."""
    from gsq.config import QuantizeConfig
    from gsq.eval.llamacpp import quantize_with_llamacpp
    from gsq.export.gguf_file import write_base_gguf
    from gsq.quant.trainer import TrainConfig
    from gsq.refine import refine_gguf

    root = tmp_path_factory.mktemp("gguf-refine")
    hf = peaked_model_dir("qwen2", demo_tok, root / "hf", **WIDE)
    write_base_gguf(str(hf), root / "base.gguf")
    quantize_with_llamacpp(root / "base.gguf", root / "q2k.gguf", "Q2_K", nthread=1)
    cfg = QuantizeConfig(nsamples=4, val_samples=2, gptq_samples=2, seqlen=SEQLEN, qk_steps=4,
                         max_blocks=1, train=TrainConfig(epochs=1, batch_size=2,
                                                         micro_batch_size=2))
    result = refine_gguf(root / "q2k.gguf", str(hf), root / "refined.gguf", cfg=cfg,
                         calib=str(texts["calib"]), progress=False, heldout_samples=2)
    return {"hf": hf, "input": root / "q2k.gguf", "result": result}


def test_refine_of_a_llamacpp_qwen2_file(llama_cpp, refined, texts):
    """Same size and tensor types; refined linears of block 0 only; llama.cpp runs the refined
    file as gsq's refined model computes (q/k rows not permuted for qwen2)."""
    result = refined["result"]
    src, out = refined["input"], result.out
    assert out.stat().st_size == src.stat().st_size
    before = [(t.name, t.type_name, t.shape) for t in read_gguf(src)[1]]
    after_tensors = read_gguf(out)[1]
    assert before == [(t.name, t.type_name, t.shape) for t in after_tensors]
    report = result.report
    assert report["blocks_refined"] == 1 and report["refined"]
    assert all(name.startswith("blk.0.") for name in report["refined"])
    assert report["passthrough"]["blk.0.attn_q.bias"]["type"] == "F32"
    types = {t.name: t.type_name for t in after_tensors}
    result_model = result.model
    vs = numerics_vs_llamacpp(out, types, result_model, result.tokenizer, texts["eval"])
    assert vs["ppl"] == pytest.approx(vs["base_ppl"], rel=5e-3), vs
    assert vs["kl"] < 1e-2 and vs["top1"] > 0.95, vs


@pytest.fixture(scope="module")
def refined_moe(llama_cpp, demo_tok, texts, tmp_path_factory) -> dict:
    """The tiny Qwen3-MoE quantized to Q4_0 by llama.cpp's own quantizer from gsq's F16 base
    file (merged expert tensors), then refined by gsq (first block, every expert)."""
    from gsq.config import QuantizeConfig
    from gsq.eval.llamacpp import quantize_with_llamacpp
    from gsq.export.gguf_file import write_base_gguf
    from gsq.quant.trainer import TrainConfig
    from gsq.refine import refine_gguf

    root = tmp_path_factory.mktemp("gguf-refine-moe")
    hf = peaked_model_dir("qwen3_moe", demo_tok, root / "hf")
    write_base_gguf(str(hf), root / "base.gguf")
    quantize_with_llamacpp(root / "base.gguf", root / "q4_0.gguf", "Q4_0", nthread=1)
    cfg = QuantizeConfig(nsamples=4, val_samples=2, gptq_samples=2, seqlen=SEQLEN, qk_steps=4,
                         max_blocks=1, train=TrainConfig(epochs=2, batch_size=2,
                                                         micro_batch_size=2))
    result = refine_gguf(root / "q4_0.gguf", str(hf), root / "refined.gguf", cfg=cfg,
                         calib=str(texts["calib"]), progress=False, heldout_samples=2)
    return {"input": root / "q4_0.gguf", "result": result}


def test_refine_of_a_llamacpp_moe_file(llama_cpp, refined_moe, texts):
    """Every expert of block 0 refined as its own slice of the merged tensors, patched in place
    (same tensors, types and size); llama.cpp runs the refined file as gsq's refined model
    computes."""
    result = refined_moe["result"]
    src, out = refined_moe["input"], result.out
    assert out.stat().st_size == src.stat().st_size
    before = [(t.name, t.type_name, t.shape) for t in read_gguf(src)[1]]
    after_tensors = read_gguf(out)[1]
    assert before == [(t.name, t.type_name, t.shape) for t in after_tensors]
    refined = result.report["refined"]
    experts = {f"blk.0.ffn_{p}_exps.weight[{e}]" for p in ("gate", "up", "down")
               for e in range(4)}
    assert experts <= set(refined) and all(k.startswith("blk.0.") for k in refined)
    assert refined["blk.0.ffn_down_exps.weight[3]"]["module"] == \
        "model.layers.0.mlp.experts.3.down_proj"
    assert result.report["passthrough"]["blk.1.ffn_up_exps.weight"]["reason"].startswith(
        "block not refined")
    assert result.report["passthrough"]["blk.0.ffn_gate_inp.weight"]["type"] == "F32"
    types = {t.name: t.type_name for t in after_tensors}
    vs = numerics_vs_llamacpp(out, types, result.model, result.tokenizer, texts["eval"])
    assert vs["ppl"] == pytest.approx(vs["base_ppl"], rel=5e-3), vs
    assert vs["kl"] < 1e-2 and vs["top1"] > 0.95, vs
