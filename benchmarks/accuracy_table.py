"""Accuracy table: RTN / GPTQ / GSQ at 4/3/2 bit, end-to-end scale stage off and on, several seeds,
evaluated on WikiText-2 test and on held-out texts of other domains (none in the calibration).

Each (method, bits, seed) runs the block loop once, is evaluated (the "e2e off" row), then gets the
end-to-end scale stage and is evaluated again ("e2e on"): the pair shares its codes, so the e2e
gain is measured without block-loop noise. Rows go to --json as they finish; a rerun with the same
--json skips the rows already there, so the table can be built in pieces (one command per method,
bit width or seed). `--summary` prints the table from the JSON: per (method, bits, e2e) the mean
over seeds with the spread (max - min), and the share of GPTQ's log-ppl gap to base that a row
closes, (ln ppl_GPTQ - ln ppl_row) / (ln ppl_GPTQ - ln ppl_base), against plain GPTQ (e2e off,
same seeds) on each domain.

GPU preset, one piece per call (each well under 10 minutes on an H100/H200):

    for b in 4 3 2; do for m in rtn gptq gsq; do for s in 0 1; do
      python benchmarks/accuracy_table.py --preset gpu --device cuda --bits $b --methods $m \\
          --seeds $s --model /root/smollm2.gguf --data /root/data \\
          --json benchmarks/results/accuracy-gpu.json
    done; done; done
    python benchmarks/accuracy_table.py --summary --json benchmarks/results/accuracy-gpu.json

How each calibration source changes the result: the same with `--calib book` (or `code`,
`fiction:1,code:1`, ...) and one --json per calibration (rows are keyed by method, bits, seed and
e2e only).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import torch

from gsq.api import (
    bits_per_parameter,
    calibration_tokens,
    calibration_windows,
    evaluate,
    load_any_model,
    resolve_device,
)
from gsq.calib.scale_finetune import capture_teacher, scale_finetune
from gsq.calib.sensitivity import allocate_widths
from gsq.calib.sequential import run_quantization
from gsq.config import PRESETS
from gsq.data.calibration import read_text, tokenize_text
from gsq.models.registry import adapter_for
from gsq.quant.types import parse_bits

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parents[1] / "shared" / "data"
DOMAINS = ("wt2", "book", "code", "tech")


def domain_paths(data: Path) -> dict[str, Path]:
    """Evaluation texts (`data`: shared/data): none of them is in the default calibration mix."""
    return {"wt2": data / "wikitext2-test.raw",
            "book": data / "calib" / "pg2701.txt",  # Moby-Dick
            "code": ROOT / "data" / "eval-code.txt.gz",
            "tech": ROOT / "data" / "eval-technical.txt.gz"}


def row_key(method: str, bits, seed: int, e2e: bool) -> str:
    return f"{method}|{bits}|{seed}|{'e2e' if e2e else 'plain'}"


def evaluate_domains(model, base_model, domains: dict[str, torch.Tensor], args, device) -> dict:
    """`gsq.eval.evaluate` of the model against its base on each domain's tokens."""
    out = {}
    for name, tokens in domains.items():
        r = evaluate(model, tokens, base=base_model, seqlen=args.seqlen,
                     max_tokens=args.max_tokens, device=str(device), progress=False)
        out[name] = {k: r[k] for k in ("ppl", "base_ppl", "kl", "top1", "tokens")}
    return out


def run_pair(method: str, bits, seed: int, base_model, calib, domains, args, device) -> list:
    """Block loop, evaluation, e2e stage, evaluation: the e2e-off and e2e-on rows."""
    preset = PRESETS[args.preset]
    gsq_e2e = preset().e2e  # the preset's stage, also for the baselines' "e2e on" rows
    bpw = float(bits[3:]) if str(bits).startswith("bpw") else None  # "bpw2.5": --bpw 2.5
    cfg = preset(method=method, bits=2 if bpw else bits, group_size=args.group_size, seed=seed,
                 max_blocks=args.max_blocks, e2e=gsq_e2e, bpw=bpw)
    if args.e2e_lr is not None:
        cfg = cfg.replace(e2e=dataclasses.replace(cfg.e2e, lr=args.e2e_lr))
    model = copy.deepcopy(base_model)
    adapter = adapter_for(model.config.model_type)
    windows = calibration_windows(calib, cfg)
    t0 = time.perf_counter()
    teacher = capture_teacher(model, adapter, windows, cfg, device)
    allocation = None
    if bpw is not None:
        cfg, allocation = allocate_widths(model, adapter, windows, cfg, device, progress=False)
    records, report = run_quantization(model, adapter, windows, cfg, device, progress=False)
    seconds = time.perf_counter() - t0 - teacher.seconds
    rows = [{"key": row_key(method, bits, seed, False), "method": method, "bits": bits,
             "seed": seed, "e2e": False, "quantize_seconds": seconds,
             "bpp": bits_per_parameter(records), "allocation": allocation,
             "eval": evaluate_domains(model, base_model, domains, args, device)}]
    if args.no_e2e:
        rows[0]["config"] = cfg.to_dict()
        return rows
    records, e2e = scale_finetune(model, adapter, records, windows, teacher, cfg, device)
    rows.append({"key": row_key(method, bits, seed, True), "method": method, "bits": bits,
                 "seed": seed, "e2e": True, "quantize_seconds": seconds + e2e["seconds"],
                 "e2e_report": {k: v for k, v in e2e.items() if k != "history"},
                 "eval": evaluate_domains(model, base_model, domains, args, device)})
    for row in rows:
        row["config"] = cfg.to_dict()
    return rows


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": [], "rows": []}


def summary(data: dict) -> str:
    """Markdown: mean (spread) over seeds per (method, bits, e2e) and domain, gap closed vs GPTQ."""
    groups: dict[tuple, list[dict]] = {}
    for row in data["rows"]:
        groups.setdefault((row["method"], str(row["bits"]), row["e2e"]), []).append(row)
    domains = list(next(iter(data["rows"]))["eval"]) if data["rows"] else []
    base = {d: next(iter(data["rows"]))["eval"][d]["base_ppl"] for d in domains}

    def mean_log_ppl(rows, d):
        return sum(math.log(r["eval"][d]["ppl"]) for r in rows) / len(rows)

    head = ["model", "seeds"] + [f"ppl {d}" for d in domains] + ["KL wt2", "top-1 wt2"] + \
        [f"gap closed {d}" for d in domains] + ["e2e val KL before -> after", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| base (fp32) | - | " + " | ".join(f"{base[d]:.3f}" for d in domains) +
             " | 0 | 1 |" + " - |" * (len(domains) + 2)]
    order = {"rtn": 0, "gptq": 1, "gsq": 2}
    for (method, bits, e2e), rows in sorted(groups.items(),
                                            key=lambda kv: (-_bits_rank(kv[0][1]),
                                                            order.get(kv[0][0], 9), kv[0][2])):
        width = bits if bits.startswith("bpw") else f"{bits}-bit"
        cells = [f"{method.upper()} {width}{' +e2e' if e2e else ''}",
                 ",".join(str(r["seed"]) for r in rows)]
        for d in domains:
            ppl = [r["eval"][d]["ppl"] for r in rows]
            cells.append(f"{math.exp(mean_log_ppl(rows, d)):.3f} ({max(ppl) - min(ppl):.2f})")
        kl = [r["eval"]["wt2"]["kl"] for r in rows] if "wt2" in domains else [float("nan")]
        top1 = [r["eval"]["wt2"]["top1"] for r in rows] if "wt2" in domains else [float("nan")]
        cells += [f"{sum(kl) / len(kl):.4f}", f"{sum(top1) / len(top1):.4f}"]
        gptq = groups.get(("gptq", bits, False))
        for d in domains:
            if not gptq:
                cells.append("-")
                continue
            g = mean_log_ppl(gptq, d)
            cells.append(f"{100 * (g - mean_log_ppl(rows, d)) / (g - math.log(base[d])):.1f}%")
        if e2e:
            before = sum(r["e2e_report"]["val_kl_before"] for r in rows) / len(rows)
            after = sum(r["e2e_report"]["val_kl_after"] for r in rows) / len(rows)
            cells.append(f"{before:.4f} -> {after:.4f}")
        else:
            cells.append("-")
        cells.append(f"{sum(r['quantize_seconds'] for r in rows) / len(rows):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bits_rank(bits: str) -> float:
    return 1.58 if bits == "ternary" else float(bits.removeprefix("bpw"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-demo")
    p.add_argument("--calib", default=None, help="calibration spec (default: the bundled mix)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--bits", nargs="+", type=parse_bits, default=None,
                   help="uniform widths (default 4 3 2, none when --bpw is given)")
    p.add_argument("--bpw", nargs="+", type=float, default=[],
                   help="rows with `--bpw X` widths instead of the --bits rows")
    p.add_argument("--no-e2e", action="store_true", help="only the block-loop (e2e off) rows")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "gsq"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--max-blocks", type=int, default=None)
    p.add_argument("--e2e-lr", type=float, default=None)
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    p.add_argument("--data", type=Path, default=SHARED,
                   help="folder with wikitext2-test.raw and calib/pg2701.txt (shared/data)")
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--summary", action="store_true", help="print the table from --json and exit")
    args = p.parse_args()
    if args.summary:
        print(summary(load_json(args.json)))
        return
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 evaluation and training, as on CPU
    data = load_json(args.json)
    done = {row["key"] for row in data["rows"]}
    base_model, tokenizer = load_any_model(args.model)
    calib = calibration_tokens(tokenizer, args.calib)
    paths = domain_paths(args.data)
    domains = {d: tokenize_text(tokenizer, read_text(paths[d])) for d in args.domains}
    data["runs"].append(run_meta(device))
    uniform = args.bits if args.bits is not None else ([] if args.bpw else [4, 3, 2])
    for bits in uniform + [f"bpw{x:g}" for x in args.bpw]:
        for method in args.methods:
            for seed in args.seeds:
                if row_key(method, bits, seed, not args.no_e2e) in done:
                    continue
                data["rows"] += run_pair(method, bits, seed, base_model, calib, domains, args,
                                         device)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(data, indent=1, default=str))
                print(summary(data), flush=True)


def run_meta(device: torch.device) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
            "command": " ".join(sys.argv), "torch": torch.__version__}


if __name__ == "__main__":
    main()
