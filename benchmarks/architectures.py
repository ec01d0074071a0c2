"""What works per architecture, and the wall time of each step, on tiny random models.

For every architecture case (gsq.models.synthetic layouts, plus linear rope and a Mistral sliding
window): build and save a 2-block model (hidden 64) with SmolLM2's tokenizer, its logits and
attention made peaked as the tests make them (final norm x20, q/k projections x8, Qwen3's q/k
norms x3), check it as `gsq quantize` does before loading (plain, and with a GGUF need), quantize
it with rtn, gptq and gsq at a tiny budget (4 + 2 + 4 windows of 32 tokens, 1 epoch of 2 steps,
2 Q/K steps, 2-bit g64), then with the gsq directory:
  * reload it (`load_quantized`), export it as compressed-tensors and load that in transformers:
    the largest |logit difference| against gsq's own dequantized model of the directory read as a
    plain transformers checkpoint and of the compressed-tensors checkpoint (0 = exact);
  * export it as GGUF (`gsq export --format gguf`) and run the file in llama.cpp against gsq's
    evaluation of the same file under llama.cpp's numerics (`gsq eval FILE.gguf --numerics
    llama.cpp`), 1,024 tokens in windows of 64: perplexity difference in %, KL and top-1;
  * `gsq refine` of llama.cpp's own Q4_0 quantization of gsq's F16 base file (both blocks, the
    same budget): the fraction of codes changed, or the refusal.
Reported: each step's wall and CPU seconds and these results; `--markdown` prints the table of
benchmarks/RESULTS.md.

    python benchmarks/architectures.py [--json benchmarks/results/archs.json] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from gsq.api import quantize
from gsq.config import QuantizeConfig
from gsq.data.calibration import tokenize_text
from gsq.errors import GSQError
from gsq.eval.llamacpp import llamacpp_compare, quantize_with_llamacpp
from gsq.eval.llamacpp_numerics import linear_roundings, llamacpp_numerics
from gsq.export.compressed_tensors import export_compressed_tensors
from gsq.export.gguf_file import export_gguf, write_base_gguf
from gsq.gguf import read_gguf
from gsq.models.loading import load_base_model, peek_architecture
from gsq.models.quantized import load_quantized
from gsq.models.registry import GGUF, check_architecture, support_table
from gsq.models.synthetic import (
    build_random_model,
    demo_tokenizer,
    peak_attention,
    random_config,
    save_random_model,
)
from gsq.quant.trainer import TrainConfig
from gsq.refine import refine_gguf

ROPE_LINEAR = {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}
CASES = {
    "llama": ("llama", {}), "llama-tied": ("llama-tied", {}), "llama3": ("llama3", {}),
    "llama-linear": ("llama", ROPE_LINEAR), "llama-yarn": ("llama-yarn", {}),
    "mistral": ("mistral", {}), "mistral-sliding": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}), "qwen3_moe": ("qwen3_moe", {}),
    "mixtral": ("mixtral", {}),
}
EVAL_SEQLEN, EVAL_TOKENS = 64, 1024
CFG = QuantizeConfig(bits=2, group_size=64, nsamples=4, val_samples=2, gptq_samples=4, seqlen=32,
                     qk_steps=2, train=TrainConfig(epochs=1, batch_size=2, micro_batch_size=2))


@contextmanager
def timed(row: dict, key: str):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    row[key] = {"wall_s": round(time.perf_counter() - wall, 3),
                "cpu_s": round(time.process_time() - cpu, 3)}


def _check(source: Path, needs: tuple[str, ...]) -> str:
    try:
        check_architecture(*peek_architecture(source), needs=needs)
        return "ok"
    except GSQError as err:
        return f"refused: {err}"


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item()


def run_case(case: str, tokenizer, calib: Path, text: str, root: Path) -> dict:
    from transformers import AutoModelForCausalLM

    arch, overrides = CASES[case]
    row: dict = {"case": case}
    with timed(row, "build_save"):
        model = build_random_model(random_config(arch, len(tokenizer), **overrides),
                                   logit_scale=20.0)
        source = save_random_model(peak_attention(model, 8.0, 3.0), tokenizer,
                                   root / f"{case}-src")
    with timed(row, "check_seconds"):
        row["check"] = _check(source, ())
    row["check_gguf"] = _check(source, (GGUF,))
    if row["check"] != "ok":
        return row
    ids = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(1))
    for method in ("rtn", "gptq", "gsq"):
        out = root / f"{case}-{method}"
        with timed(row, f"quantize_{method}"):
            quantize(str(source), CFG.replace(method=method), calib=str(calib), out=out,
                     progress=False)
    with timed(row, "load_quantized"):
        loaded, _, _ = load_quantized(out)  # gsq's own dequantized model, from the codes
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    row["plain_max_logit_diff"] = _max_diff(plain, loaded, ids)
    with timed(row, "export_ct"):
        export_compressed_tensors(out, root / f"{case}-ct")
    with timed(row, "load_ct"):
        ct = AutoModelForCausalLM.from_pretrained(root / f"{case}-ct", dtype=torch.float32)
    row["ct_max_logit_diff"] = _max_diff(ct.eval(), loaded, ids)
    # Loaded with dtype=float32, transformers decompresses fused MoE experts in the checkpoint's
    # scale dtype (bf16 here) and computes them in it; in the checkpoint's own dtype both loads
    # must agree exactly.
    row["ct_bf16_max_logit_diff"] = _max_diff(
        AutoModelForCausalLM.from_pretrained(root / f"{case}-ct", dtype=torch.bfloat16).eval(),
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval(), ids)
    if row["check_gguf"] == "ok":
        _gguf_steps(row, out, source, calib, text, root / case)
    return row


def _gguf_steps(row: dict, qdir: Path, source: Path, calib: Path, text: str,
                root: Path) -> None:
    """GGUF export of the gsq directory, llama.cpp against `--numerics llama.cpp` on it, and
    `gsq refine` of llama.cpp's own Q4_0 file."""
    root.mkdir()
    with timed(row, "export_gguf"):
        report = export_gguf(qdir, root / "gsq.gguf")
    row["gguf_types"] = report["tensor_types"]
    with timed(row, "llamacpp_agreement"):
        model, tokenizer = load_base_model(root / "gsq.gguf")
        types = {t.name: t.type_name for t in read_gguf(root / "gsq.gguf")[1]}
        with llamacpp_numerics(model, linear_roundings(model, types)):
            result = llamacpp_compare(root / "gsq.gguf", model, tokenize_text(tokenizer, text),
                                      EVAL_SEQLEN, EVAL_TOKENS, progress=False)
    row["agreement"] = {"ppl_diff_pct": 100 * (result["ppl"] / result["base_ppl"] - 1),
                        "kl": result["kl"], "top1": result["top1"], "ppl_gsq": result["base_ppl"]}
    write_base_gguf(str(source), root / "base.gguf")
    quantize_with_llamacpp(root / "base.gguf", root / "q4_0.gguf", "Q4_0", nthread=1)
    try:
        with timed(row, "refine"):
            refined = refine_gguf(root / "q4_0.gguf", str(source), root / "refined.gguf",
                                  cfg=CFG.replace(method="gsq"), calib=str(calib),
                                  progress=False, heldout_samples=0)
        row["refine_changed"] = refined.report["changed_fraction"]
    except GSQError as err:
        row["refine_changed"] = f"refused: {err}"


def markdown(rows: list[dict]) -> str:
    """The RESULTS.md table: wall seconds (CPU seconds) per step, then the results."""
    def t(row: dict, key: str) -> str:
        return f"{row[key]['wall_s']:.1f} ({row[key]['cpu_s']:.1f})" if key in row else "-"

    head = ("| case | GGUF need | rtn | gptq | gsq | CT export + load | max logit diff "
            "(plain / CT; CT vs plain in bf16) | GGUF export | llama.cpp vs `--numerics "
            "llama.cpp`: ppl diff %, KL, top-1 (s) | refine llama.cpp Q4_0: codes changed (s) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if r["check"] != "ok":
            lines.append(f"| {r['case']} | {r['check_gguf']} | {r['check']} |" + " |" * 7)
            continue
        ct = r["export_ct"]["wall_s"] + r["load_ct"]["wall_s"]
        a = r.get("agreement")
        agree = (f"{a['ppl_diff_pct']:+.3f}, {a['kl']:.1e}, {a['top1']:.3f} "
                 f"({r['llamacpp_agreement']['wall_s']:.0f})") if a else "-"
        changed = r.get("refine_changed", "-")
        refine = (f"{100 * changed:.1f}% ({r['refine']['wall_s']:.0f})"
                  if isinstance(changed, float) else changed.split(":")[0])
        lines.append(f"| {r['case']} | {r['check_gguf']} | {t(r, 'quantize_rtn')} | "
                     f"{t(r, 'quantize_gptq')} | {t(r, 'quantize_gsq')} | {ct:.1f} | "
                     f"{r['plain_max_logit_diff']:.2g} / {r['ct_max_logit_diff']:.2g}; "
                     f"{r.get('ct_bf16_max_logit_diff', float('nan')):.2g} | "
                     f"{t(r, 'export_gguf')} | {agree} | {refine} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--markdown", action="store_true", help="print the RESULTS.md table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = demo_tokenizer()
    book = (Path(__file__).resolve().parents[1] / "src/gsq/data/bundled/pg1342.txt").read_text(
        encoding="utf-8")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gsq-archs-") as tmp:
        calib = Path(tmp) / "calib.txt"
        calib.write_text(book[20_000:40_000])
        for case in args.cases.split(","):
            rows.append(run_case(case, tokenizer, calib, book[40_000:52_000], Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "support_table": support_table(), "rows": rows,
              "torch_threads": 1}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
