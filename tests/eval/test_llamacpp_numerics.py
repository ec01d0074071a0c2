"""`gsq eval --numerics llama.cpp`: llama.cpp's CPU arithmetic emulated in PyTorch.

The activation roundings are checked value for value: Q8_0 against the `gguf` package's reference
quantizer, Q8_K against a loop written from ggml's `quantize_row_q8_K_ref`. The whole emulation is
checked against llama.cpp itself: a tiny random Llama (widths 256/512, so K-quants apply) is
quantized by llama.cpp's own quantizer to Q4_0, Q4_K_M and Q2_K, and the emulated logits must
sit several times closer to llama.cpp's than the exact fp32 ones do. Its RMSNorm weights are random:
with all-ones norms and a Q4_0 embedding, activations land exactly on rounding ties, where ulp-level
differences decide the int8 value and no emulation can agree.

Tests that need llama_cpp fail (not skip) when it is missing: CI installs it with `.[dev]`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gsq.errors import GSQError
from gsq.eval import llamacpp_numerics as numerics
from gsq.eval.llamacpp_numerics import (
    f16_attention,
    linear_roundings,
    llamacpp_numerics,
    round_activations,
    round_q8_0,
    round_q8_k,
)


def _activations(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed activations [rows, cols] with one all-zero block."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.rand(rows, cols, generator=gen) * 4
    x[0, :256] = 0.0
    return x


def _q8_k_reference(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_K_ref followed by dequantization, one 256-block at a time."""
    out = np.zeros_like(x, dtype=np.float32)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 256):
            block = x[r, b:b + 256].astype(np.float32)
            amax, vmax = np.float32(0), np.float32(0)
            for v in block:  # the first value of largest magnitude, with its sign
                if abs(v) > amax:
                    amax, vmax = abs(v), v
            if amax == 0:
                continue
            iscale = np.float32(-127.0) / vmax
            q = np.minimum(127, np.rint(iscale * block))  # rint: ties to even, as nearest_int
            out[r, b:b + 256] = q.astype(np.float32) * (np.float32(1.0) / iscale)
    return out


def test_q8_0_rounding_equals_the_gguf_reference_quantizer():
    import gguf

    x = _activations(16, 1536)
    q8 = gguf.GGMLQuantizationType.Q8_0
    ref = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), q8), q8)
    ours = round_q8_0(x).numpy()
    differ = ours != ref
    # The reference rounds x / d half away from zero, llama.cpp's x86 kernel x * (127 / amax) half
    # to even: an exact tie may round either way, by one quantum at most.
    assert differ.mean() < 1e-3
    quantum = np.repeat(np.abs(x.numpy()).reshape(16, -1, 32).max(-1) / 127, 32, axis=1)
    assert np.all(np.abs(ours - ref)[differ] <= 1.01 * quantum[differ])
    assert np.all(ours[0, :256] == 0)


def test_q8_0_values_are_int8_multiples_of_an_fp16_scale():
    x = _activations(4, 256, seed=1)
    blocks = round_q8_0(x).reshape(4, -1, 32)
    d = (x.reshape(4, -1, 32).abs().amax(-1, keepdim=True) / 127).half().float()
    q = blocks / torch.where(d > 0, d, torch.ones_like(d))
    assert torch.equal(q, q.round()) and q.abs().max() <= 127


def test_q8_k_rounding_equals_ggml_reference_loop():
    x = _activations(6, 512, seed=2)
    x[1, 300] = -50.0  # a negative value of largest magnitude: the scale follows its sign
    x[2, 10], x[2, 20] = 30.0, -30.0  # a tie in magnitude: the first one wins
    assert np.array_equal(round_q8_k(x).numpy(), _q8_k_reference(x.numpy()))


def test_float_roundings_and_none():
    x = _activations(2, 64, seed=3).double()
    assert round_activations(x, None) is x
    assert torch.equal(round_activations(x, "f16"), x.half().double())
    assert torch.equal(round_activations(x, "bf16"), x.bfloat16().double())
    assert round_activations(x.float(), "q8_0").dtype == torch.float32


@pytest.mark.parametrize(("fn", "cols"), [(round_q8_0, 48), (round_q8_k, 320)])
def test_rows_must_be_whole_blocks(fn, cols):
    with pytest.raises(GSQError, match="not whole blocks"):
        fn(torch.ones(2, cols))


def test_f16_attention_is_causal_attention_up_to_fp16():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, h, 10, 16, generator=gen) for h in (4, 2, 2))
    ours = f16_attention(q, k, v, None, 0.25)  # [1, 10, 4, 16]
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k4, v4, is_causal=True, scale=0.25)
    assert ours.shape == (1, 10, 4, 16)
    torch.testing.assert_close(ours, ref.transpose(1, 2), atol=5e-3, rtol=0)
    assert not torch.equal(ours, ref.transpose(1, 2))  # fp16 rounding did happen
    mask = torch.zeros(1, 1, 10, 10).masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(),
                                                 float("-inf"))
    assert torch.equal(f16_attention(q, k, v, mask, 0.25), ours)


# --------------------------------------------------------------------------------------------
# Against llama.cpp


FILE_TYPES = ("Q4_0", "Q4_K_M", "Q2_K")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, llama_cpp, tiny_llama, build_byte_bpe_tokenizer) -> dict:
    """A tiny Llama (hidden 256, ffn 512, random norms, peaked attention) as an F32 GGUF and as
    llama.cpp's own quantizations of it."""
    from gsq.eval.llamacpp import quantize_with_llamacpp
    from gsq.export.gguf_file import write_base_gguf

    root = tmp_path_factory.mktemp("numerics")
    tokenizer = build_byte_bpe_tokenizer()
    model = tiny_llama(0, vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(0.5 + torch.rand(256, generator=gen))
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    write_base_gguf(str(root / "hf"), root / "f32.gguf", "F32")
    files = {"vocab": len(tokenizer)}
    for ftype in FILE_TYPES:
        files[ftype] = root / f"{ftype}.gguf"
        quantize_with_llamacpp(root / "f32.gguf", files[ftype], ftype)
    return files


def _tensor_types(path) -> dict[str, str]:
    from gsq.gguf import read_gguf

    return {t.name: t.type_name for t in read_gguf(path)[1]}


@pytest.mark.parametrize("ftype", FILE_TYPES)
def test_emulated_logits_are_close_to_llamacpp(tiny_files, ftype):
    from gsq.eval.llamacpp import LlamaCppModel
    from gsq.models.loading import load_base_model

    path = tiny_files[ftype]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tiny_files["vocab"], (1, 128), generator=gen)
    model, _ = load_base_model(path)
    roundings = linear_roundings(model, _tensor_types(path))
    theirs = LlamaCppModel(path, n_ctx=256, n_threads=1)(ids).logits[0].double()
    with torch.inference_mode():
        exact = model(input_ids=ids).logits[0].double()
        with llamacpp_numerics(model, roundings):
            emulated = model(input_ids=ids).logits[0].double()
        after = model(input_ids=ids).logits[0].double()
    gap_exact = (exact - theirs).abs().mean().item()
    gap_emulated = (emulated - theirs).abs().mean().item()
    assert gap_emulated < 0.3 * gap_exact, (gap_emulated, gap_exact)
    assert torch.equal(after, exact)  # hooks and attention restored on exit
    assert model.config._attn_implementation != numerics.ATTENTION_NAME


def test_roundings_follow_each_tensor_type(tiny_files):
    from gsq.models.loading import load_base_model

    path = tiny_files["Q2_K"]
    types = _tensor_types(path)
    model, _ = load_base_model(path)
    roundings = linear_roundings(model, types)
    assert types["blk.0.attn_q.weight"] in ("Q2_K", "Q3_K") and \
        roundings["model.layers.0.self_attn.q_proj"] == "q8_K"
    lm_head_type = types.get("output.weight", types["token_embd.weight"])
    assert roundings["lm_head"] == numerics.ACTIVATION_ROUNDING[lm_head_type]
    del types["blk.1.ffn_up.weight"]
    with pytest.raises(GSQError, match="blk.1.ffn_up.weight"):
        linear_roundings(model, types)
    types["blk.1.ffn_up.weight"] = "IQ2_XXS"
    with pytest.raises(GSQError, match="IQ2_XXS"):
        linear_roundings(model, types)
