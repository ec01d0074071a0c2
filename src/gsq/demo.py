"""The demo: SmolLM2-135M-Instruct quantized with RTN, GPTQ and GSQ on the CPU, one table.

Every row uses the same model, calibration text (the bundled book), group size and seed, and is
evaluated on the same text against the full-precision model (perplexity, KL, top-1 agreement).
"""

from __future__ import annotations

import logging
from pathlib import Path

from gsq.config import QuantizeConfig, cpu_preset

log = logging.getLogger(__name__)

DEMO_SOURCE = "smollm2-demo"


def format_table(rows: list[dict]) -> str:
    """Markdown table of result rows (keys: name, ppl, kl, top1, bpp, seconds, peak_gib)."""
    head = "| model | ppl | KL vs base | top-1 | bpp | quantize s | peak RAM GiB |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        def fmt(key, spec, r=r):
            value = r.get(key)
            return "-" if value is None else format(value, spec)
        lines.append(f"| {r['name']} | {fmt('ppl', '.3f')} | {fmt('kl', '.4f')} | "
                     f"{fmt('top1', '.4f')} | {fmt('bpp', '.3f')} | {fmt('seconds', '.0f')} | "
                     f"{fmt('peak_gib', '.2f')} |")
    return "\n".join(lines)


def run_demo(bits=2, group_size: int = 64, text: str | None = None, max_tokens: int | None = 16384,
             max_blocks: int | None = None, out_dir: str = "runs/demo", device: str = "cpu",
             progress: bool = True, seqlen: int = 2048) -> list[dict]:
    from gsq.api import evaluate, load_any_model, quantize
    from gsq.data.calibration import read_text, tokenize_text

    base_model, tokenizer = load_any_model(DEMO_SOURCE)
    tokens = tokenize_text(tokenizer, read_text(text))
    kw = {"seqlen": seqlen, "max_tokens": max_tokens, "device": device, "progress": progress}
    base = evaluate(base_model, tokens, base=base_model, **kw)
    rows = [{"name": "base (fp32)", "ppl": base["ppl"], "kl": 0.0, "top1": 1.0, "bpp": 32.0}]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for method in ("rtn", "gptq", "gsq"):
        cfg: QuantizeConfig = cpu_preset(method=method, bits=bits, group_size=group_size,
                                         max_blocks=max_blocks)
        out = Path(out_dir) / f"{method}-{bits}bit-g{group_size}"
        result = quantize(DEMO_SOURCE, cfg, out=out, device=device, progress=progress,
                          overwrite=True)
        metrics = evaluate(result.model, tokens, base=base_model, **kw)
        r = result.report
        rows.append({"name": f"{method.upper()} {bits}-bit g{group_size}", **metrics,
                     "bpp": r["bpp"], "seconds": r["quantize_seconds"],
                     "peak_gib": r["peak_host_rss_gib"]})
        print(format_table(rows), flush=True)
    return rows
