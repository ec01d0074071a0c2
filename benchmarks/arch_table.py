"""Every architecture through gsq's user path, timed on tiny models (issue 11's table).

For each architecture of gsq.models.synthetic (2 blocks, hidden 64, SmolLM2's tokenizer; logits
and attention made peaked as the tests make them), one row:
  quantize   RTN (attention 4-bit, MLP 2-bit, g64) and GSQ (tiny budget, same grids), wall time;
  gguf       `export_gguf` of the RTN directory: seconds, file size, tensor types;
  agreement  llama.cpp's perplexity on the file vs gsq's evaluation of the file under llama.cpp's
             numerics (`gsq eval FILE.gguf --numerics llama.cpp`), same tokens: relative
             difference in %, KL(gsq || llama.cpp) and top-1 agreement;
  refine     `gsq refine` of llama.cpp's own Q4_0 of gsq's F16 base file (both blocks, tiny
             budget): seconds, fraction of codes changed;
  ct         compressed-tensors export of the RTN directory, loaded by transformers: seconds,
             max |logit - gsq's| on one window.
An architecture whose step fails gets the one-line error in that cell.

    python benchmarks/arch_table.py [--archs llama,qwen3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

SEQLEN, MAX_TOKENS = 64, 1024
LOGIT_SCALE, QK_GAIN, QK_NORM_GAIN = 20.0, 8.0, 3.0


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _config(method: str):
    from gsq.config import QuantizeConfig
    from gsq.quant.trainer import TrainConfig

    return QuantizeConfig(method=method, bits=2, group_size=64, nsamples=4, val_samples=1,
                          gptq_samples=2, seqlen=SEQLEN, qk_steps=8,
                          bits_overrides=(("*.self_attn.*", 4),),
                          train=TrainConfig(epochs=1, batch_size=2, micro_batch_size=2))


def _agreement(path: Path, text: str) -> tuple[dict, float]:
    from gsq.data.calibration import tokenize_text
    from gsq.eval.llamacpp import llamacpp_compare
    from gsq.eval.llamacpp_numerics import linear_roundings, llamacpp_numerics
    from gsq.gguf import read_gguf
    from gsq.models.loading import load_base_model

    t0 = time.perf_counter()
    model, tokenizer = load_base_model(path)
    types = {t.name: t.type_name for t in read_gguf(path)[1]}
    tokens = tokenize_text(tokenizer, text)
    with llamacpp_numerics(model, linear_roundings(model, types)):
        result = llamacpp_compare(path, model, tokens, SEQLEN, MAX_TOKENS, progress=False)
    return result, time.perf_counter() - t0


def _refine(hf: Path, root: Path, calib: Path) -> tuple[dict, float]:
    from gsq.eval.llamacpp import quantize_with_llamacpp
    from gsq.export.gguf_file import write_base_gguf
    from gsq.export.gguf_refine import refine_gguf

    write_base_gguf(str(hf), root / "base.gguf")
    quantize_with_llamacpp(root / "base.gguf", root / "q4_0.gguf", "Q4_0")
    result, seconds = _timed(refine_gguf, root / "q4_0.gguf", str(hf), root / "refined.gguf",
                             cfg=_config("gsq"), calib=str(calib), progress=False,
                             heldout_samples=2)
    return result.report, seconds


def _compressed_tensors(qdir: Path, out: Path, tokens: torch.Tensor) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    from gsq.api import load_any_model
    from gsq.export.compressed_tensors import export_compressed_tensors

    _, seconds = _timed(export_compressed_tensors, qdir, out)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference, _ = load_any_model(str(qdir))
    ids = tokens[:SEQLEN].unsqueeze(0)
    with torch.no_grad():
        diff = (loaded(ids).logits - reference(ids).logits).abs().max().item()
    return seconds, diff


def _cell(row: dict, key: str, fn):
    """Run one step; its error's first line goes into the row instead of failing the table."""
    try:
        fn()
    except Exception as err:  # a benchmark row, not the product: report and go on
        row[key] = f"error: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}"
        traceback.print_exc()


def run_arch(arch: str, tokenizer, root: Path, calib: Path, text: str) -> dict:
    from gsq.api import quantize
    from gsq.data.calibration import tokenize_text
    from gsq.export.gguf_file import export_gguf
    from gsq.models.synthetic import (
        build_random_model,
        peak_attention,
        random_config,
        save_random_model,
    )

    model = build_random_model(random_config(arch, len(tokenizer)), logit_scale=LOGIT_SCALE)
    hf = save_random_model(peak_attention(model, QK_GAIN, QK_NORM_GAIN), tokenizer, root / "hf")
    row: dict = {"arch": arch, "model_type": model.config.model_type}

    def quant():
        _, row["rtn_s"] = _timed(quantize, str(hf), _config("rtn"), calib=str(calib),
                                 out=root / "rtn", progress=False)
        _, row["gsq_s"] = _timed(quantize, str(hf), _config("gsq"), calib=str(calib),
                                 out=root / "gsq", progress=False)

    def gguf():
        report, row["gguf_s"] = _timed(export_gguf, root / "rtn", root / "rtn.gguf")
        row["gguf_mib"] = report["file_bytes"] / 2**20
        row["gguf_types"] = report["tensor_types"]
        result, row["agreement_s"] = _agreement(root / "rtn.gguf", text)
        row["agreement_pct"] = 100 * (result["ppl"] / result["base_ppl"] - 1)
        row.update(ppl_llamacpp=result["ppl"], ppl_gsq=result["base_ppl"], kl=result["kl"],
                   top1=result["top1"])

    def refine():
        report, row["refine_s"] = _refine(hf, root, calib)
        row["refine_changed"] = report["changed_fraction"]
        row["refine_types"] = report["refined_types"]

    def ct():
        tokens = tokenize_text(tokenizer, text)
        row["ct_s"], row["ct_max_logit_diff"] = _compressed_tensors(root / "rtn", root / "ct",
                                                                     tokens)

    for key, step in (("quantize", quant), ("gguf", gguf), ("refine", refine), ("ct", ct)):
        _cell(row, key, step)
    return row


def _fmt(row: dict, key: str, fmt: str, error_key: str) -> str:
    if error_key in row:
        return row[error_key]
    return format(row[key], fmt) if key in row else "-"


def markdown(rows: list[dict]) -> str:
    head = ("| architecture | model type | quantize rtn / gsq (s) | GGUF export (s, MiB) | "
            "llama.cpp vs gsq numerics: ppl diff %, KL, top-1 (eval s) | refine Q4_0 (s, codes "
            "changed) | compressed-tensors (s, max logit diff) |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        quant = r.get("quantize") or f"{r['rtn_s']:.1f} / {r['gsq_s']:.1f}"
        gguf = r.get("gguf") or f"{r['gguf_s']:.1f}, {r['gguf_mib']:.2f}"
        agree = r.get("gguf") or (f"{r['agreement_pct']:+.3f}, {r['kl']:.1e}, {r['top1']:.3f} "
                                  f"({r['agreement_s']:.0f})")
        refine = r.get("refine") or f"{r['refine_s']:.1f}, {100 * r['refine_changed']:.1f}%"
        ct = r.get("ct") or f"{r['ct_s']:.1f}, {r['ct_max_logit_diff']:.1e}"
        lines.append(f"| {r['arch']} | {r['model_type']} | {quant} | {gguf} | {agree} | "
                     f"{refine} | {ct} |")
    return "\n".join(lines)


def main() -> None:
    from gsq.data.calibration import bundled_text_path, read_text
    from gsq.models.synthetic import ARCHITECTURES, demo_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = demo_tokenizer()
    text = read_text(bundled_text_path())
    rows = []
    with tempfile.TemporaryDirectory(prefix="gsq-arch-table-") as tmp:
        calib = Path(tmp) / "calib.txt"
        calib.write_text(text[10_000:16_000])
        for arch in args.archs.split(","):
            root = Path(tmp) / arch
            root.mkdir()
            rows.append(run_arch(arch, tokenizer, root, calib, text[40_000:52_000]))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
