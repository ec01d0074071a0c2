"""How close `gsq eval --numerics llama.cpp` comes to llama.cpp's own logits.

Part 1 (always): a tiny random Llama (hidden 256, ffn 512, 2 blocks, random RMSNorm weights, q/k
scaled up for peaked attention) is written as an F32 GGUF and quantized by llama.cpp's own
quantizer to each --ftypes type. For each file: mean |logit - llama.cpp's logit| over 128 random
tokens, for exact fp32 and for the emulation.

Part 2 (with --gguf FILE): the same on a real model file over its first --tokens WikiText-2 tokens,
plus how chaotic the rounding is there: the correlation of the emulation's effect on the logits
(emulated - exact) with and without fp16 attention, i.e. under a tiny perturbation of the hidden
states. A value well below 1 means logits cannot match pointwise, only on average.

    python benchmarks/numerics_check.py [--gguf runs/gt_local/lc-Q4_0.gguf] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from gsq.eval import llamacpp_numerics as numerics
from gsq.eval.llamacpp import LlamaCppModel, quantize_with_llamacpp
from gsq.export.gguf_file import write_base_gguf
from gsq.gguf import read_gguf
from gsq.models.loading import load_base_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_base(root: Path) -> Path:
    """The tiny Llama as an F32 GGUF (byte-level BPE tokenizer with a few merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("i", "n")]
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    write_base_gguf(str(root / "hf"), root / "f32.gguf", "F32")
    return root / "f32.gguf"


def logits_three_ways(path: Path, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp64 logits [n, vocab] of llama.cpp, exact fp32, emulated, emulated without fp16
    attention, and exact with fp16 attention only."""
    types = {t.name: t.type_name for t in read_gguf(path)[1]}
    model, _ = load_base_model(path)
    roundings = numerics.linear_roundings(model, types)
    out = {"llama.cpp": LlamaCppModel(path, n_ctx=max(256, ids.shape[1]))(ids).logits[0]}
    with torch.inference_mode():
        out["exact"] = model(input_ids=ids).logits[0]
        with numerics.llamacpp_numerics(model, roundings):
            out["emulated"] = model(input_ids=ids).logits[0]
            model.set_attn_implementation("sdpa")
            out["linears only"] = model(input_ids=ids).logits[0]
        with numerics.llamacpp_numerics(model, {}):
            out["attention only"] = model(input_ids=ids).logits[0]
    return {k: v.double() for k, v in out.items()}


def gaps(path: Path, ids: torch.Tensor) -> dict[str, float]:
    lg = logits_three_ways(path, ids)
    mean = lambda a, b: (lg[a] - lg[b]).abs().mean().item()  # noqa: E731
    with_attn = (lg["emulated"] - lg["attention only"]).flatten()
    without = (lg["linears only"] - lg["exact"]).flatten()
    return {"exact_vs_llamacpp": mean("exact", "llama.cpp"),
            "emulated_vs_llamacpp": mean("emulated", "llama.cpp"),
            "fp16_attention_perturbation": mean("attention only", "exact"),
            "rounding_effect_corr": torch.corrcoef(torch.stack([with_attn, without]))[0, 1].item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ftypes", nargs="+", default=["Q4_0", "Q4_K_M", "Q2_K", "Q3_K_M", "Q5_0",
                                                   "F16"])
    p.add_argument("--gguf", default=None, help="also check this model file (part 2)")
    p.add_argument("--text", default=str(SHARED / "wikitext2-test.raw"))
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    result = {"tiny": {}}
    with tempfile.TemporaryDirectory(prefix="gsq-numerics-") as tmp:
        base = tiny_base(Path(tmp))
        ids = torch.randint(0, 259, (1, 128), generator=torch.Generator().manual_seed(1))
        for ftype in args.ftypes:
            path = Path(tmp) / f"{ftype}.gguf"
            quantize_with_llamacpp(base, path, ftype)
            result["tiny"][ftype] = gaps(path, ids)
            print(ftype, json.dumps(result["tiny"][ftype]), flush=True)
    if args.gguf:
        from gsq.data.calibration import read_text, tokenize_text

        _, tokenizer = load_base_model(args.gguf)
        ids = tokenize_text(tokenizer, read_text(args.text))[: args.tokens].unsqueeze(0)
        result["gguf"] = {"file": args.gguf, "tokens": args.tokens, **gaps(Path(args.gguf), ids)}
        print(json.dumps(result["gguf"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
