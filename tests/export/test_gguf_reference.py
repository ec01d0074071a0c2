"""GGUF files byte for byte: what `export_gguf` and `write_base_gguf` write for fixed tiny models
must not change when the code that writes them is reorganised.

Each recipe below builds a tiny random Llama (seeded), quantizes it with RTN (deterministic), saves
a gsq directory and exports it; the sha256 of every file was recorded from the code before the
GGUF layer moved into `gsq.gguf`. Together the files hold every block type gsq encodes (exact and
lossy), the three float types, a converted tensor (token_embd as Q8_0), the q/k row permutation and
a converted BPE tokenizer.

The hashes depend on torch's random initialisation, transformers' config defaults and the gguf
writer as pinned for CI; a version bump of those may change them legitimately: then re-record them
with the code of the commit before the change under test, never with the changed code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from gsq.export.gguf_file import export_gguf, write_base_gguf
from gsq.io.quantized_dir import save_quantized
from gsq.models.quantized import apply_records
from gsq.quant.rtn import rtn_quantize
from gsq.quant.target import target_spec
from gsq.quant.types import QuantSpec

# module suffix -> spec, per recipe
MIXED = {"self_attn.q_proj": QuantSpec(4, 32), "self_attn.k_proj": QuantSpec(4, 32),
         "self_attn.v_proj": QuantSpec(3, 32), "self_attn.o_proj": QuantSpec(4, 64),
         "mlp.gate_proj": QuantSpec(2, 64), "mlp.up_proj": QuantSpec("ternary", 64),
         "mlp.down_proj": QuantSpec(2, 128)}
TARGETED = {"self_attn.q_proj": target_spec("Q2_K"), "self_attn.k_proj": target_spec("Q3_K"),
            "self_attn.v_proj": target_spec("Q4_K"), "self_attn.o_proj": target_spec("TQ1_0"),
            "mlp.gate_proj": target_spec("TQ2_0"), "mlp.up_proj": target_spec("Q2_0"),
            "mlp.down_proj": target_spec("Q4_0")}
# lossy overrides: the remaining block types, each rounded from another grid
MIXED_LOSSY = {"blk.0.attn_q": "Q5_1", "blk.1.attn_q": "Q4_1", "blk.*.attn_v": "Q5_0",
               "blk.*.ffn_up": "Q2_0", "blk.1.ffn_gate": "Q8_0", "token_embd": "Q8_0",
               "output": "Q4_1"}
TARGETED_LOSSY = {"blk.0.attn_q": "Q5_K", "blk.1.attn_q": "Q6_K", "blk.*.attn_k": "Q4_K",
                  "blk.*.ffn_gate": "TQ1_0", "blk.0.attn_v": "Q2_K", "blk.1.attn_v": "Q3_K"}

# recorded with the code of commit a3bcde5 (before gsq.gguf existed)
EXPECTED = {
    "mixed": "ebfe6724b91ed1085efbd0614109129af07ec273fe425a079eea220f134f7733",
    "mixed-lossy-bf16": "d0700580e3114ca527d3a1c243d07e16931cb41abed2c4be1b8ca8f355377fff",
    "targeted": "563d354b80ab5994038b1e9432b6758174e9e7f0d418ab72779dffb454dfb1df",
    "targeted-lossy": "c1bc909509c9d5bbf232d9c94e51a8e8b03defbee0d2fce2ef047791839506a3",
    "base-f16": "77a63d1712e1c928496e6b4d27012d79dc95b5d7125f630e043470a5875613d2",
    "base-bf16": "ebaf3ff07e3138784a74208f839b0673318187c8aa8ce5a1d75cbdc1bf5aeb73",
}


def _quantized_dir(root: Path, model, tokenizer, specs: dict) -> Path:
    """RTN every block linear of `model` with `specs` and save a gsq directory `root / 'q'`."""
    with torch.no_grad():
        for layer in model.model.layers:  # peaked attention, as the llama.cpp tests use
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    records = {f"model.layers.{i}.{name}": rtn_quantize(
        model.get_submodule(f"model.layers.{i}.{name}").weight, spec)
        for i in range(len(model.model.layers)) for name, spec in specs.items()}
    apply_records(model, records)
    root.mkdir()
    save_quantized(root / "q", model, tokenizer, records, {"method": "rtn"}, {"model": "tiny"})
    return root / "q"


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_llama, build_byte_bpe_tokenizer) -> dict[str, Path]:
    """Every reference file, by recipe name."""
    tokenizer = build_byte_bpe_tokenizer()
    root = tmp_path_factory.mktemp("reference")
    out = {}
    mixed = _quantized_dir(root / "mixed", tiny_llama(0, vocab_size=len(tokenizer)), tokenizer,
                           MIXED)
    export_gguf(mixed, out.setdefault("mixed", root / "mixed.gguf"))
    export_gguf(mixed, out.setdefault("mixed-lossy-bf16", root / "mixed-lossy.gguf"),
                float_type="BF16", type_overrides=MIXED_LOSSY, lossy=True)
    wide = tiny_llama(1, vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512)
    wide.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    write_base_gguf(str(root / "hf"), out.setdefault("base-f16", root / "base-f16.gguf"))
    write_base_gguf(str(root / "hf"), out.setdefault("base-bf16", root / "base-bf16.gguf"),
                    float_type="BF16")
    targeted = _quantized_dir(root / "targeted", wide, tokenizer, TARGETED)
    export_gguf(targeted, out.setdefault("targeted", root / "targeted.gguf"))
    export_gguf(targeted, out.setdefault("targeted-lossy", root / "targeted-lossy.gguf"),
                type_overrides=TARGETED_LOSSY, lossy=True)
    return out


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_exported_file_is_byte_identical_to_the_reference(written, recipe):
    digest = hashlib.sha256(written[recipe].read_bytes()).hexdigest()
    assert digest == EXPECTED[recipe], recipe
