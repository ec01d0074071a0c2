"""Quality table: RTN / GPTQ / GSQ on one model, same calibration set, group size and seed.

Rows (pick with --rows): "main" = RTN, GPTQ, GSQ at each --bits with the --preset budget, all
linears of every block; "reference" = GPTQ and GSQ, MLP only, at the budget the authors' reference
code was measured with (method spec §21: 256 train + 32 val + 128 GPTQ sequences of 2048
tokens, batch 32, micro-batch 8, 10 epochs = 80 Lion steps per block), 2 and 3 bit.
Columns: WikiText-2 perplexity, KL(base || quantized) and top-1 agreement (first --max-tokens
tokens, windows of --seqlen, fp32), bpp, quantize wall time, peak host RSS and CUDA memory.

    python benchmarks/quality.py --device cuda --bits 4 3 2 ternary --rows main reference \
        --json benchmarks/results/quality-gpu.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import os
import platform
import sys
from pathlib import Path

import torch

from gsq.api import calibration_tokens, evaluate, load_any_model, quantize_model, resolve_device
from gsq.config import PRESETS, QuantizeConfig
from gsq.data.calibration import read_text, tokenize_text
from gsq.demo import format_table
from gsq.quant.trainer import TrainConfig
from gsq.quant.types import parse_bits

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def reference_budget(**changes) -> QuantizeConfig:
    """The budget of the reference-code measurement (method §21), MLP only."""
    train = TrainConfig(epochs=10, batch_size=32, micro_batch_size=8)
    return QuantizeConfig(scope="mlp-only", nsamples=256, val_samples=32, gptq_samples=128,
                          seqlen=2048, train=train, **changes)


def field_overrides(pairs: list[str], cls: type = TrainConfig, flag: str = "--train") -> dict:
    """`KEY=VALUE ...` of `flag` -> changes to the dataclass `cls` (TrainConfig for --train,
    QuantizeConfig for --set), each value parsed as its field's type ("none" -> None); only
    scalar fields."""
    defaults = cls()
    fields = {f.name for f in dataclasses.fields(cls)
              if isinstance(getattr(defaults, f.name), (bool, int, float, str, type(None)))}
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"{flag} {pair!r}: expected KEY=VALUE with KEY in {sorted(fields)}")
        default = getattr(defaults, key)
        if value.lower() == "none":
            changes[key] = None
        elif isinstance(default, bool):
            changes[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            changes[key] = type(default)(value)
        else:
            changes[key] = value
    return changes


def with_train(cfg: QuantizeConfig, changes: dict) -> QuantizeConfig:
    return cfg.replace(train=dataclasses.replace(cfg.train, **changes)) if changes else cfg


def planned_rows(args) -> list[tuple[str, QuantizeConfig]]:
    rows = []
    common = {"group_size": args.group_size, "seed": args.seed, "max_blocks": args.max_blocks}
    changes = field_overrides(args.train)
    common.update(field_overrides(args.set, QuantizeConfig, "--set"))
    tag = f" [{' '.join(args.set + args.train)}]" if args.set or args.train else ""
    for bits in args.bits:
        if "main" in args.rows:
            for method in args.methods:
                cfg = with_train(PRESETS[args.preset](method=method, bits=bits, **common), changes)
                rows.append((f"{method.upper()} {bits}-bit ({args.preset} preset){tag}", cfg))
        if "reference" in args.rows and bits in (2, 3):
            for method in ("rtn", "gptq", "gsq"):
                if method in args.methods:
                    cfg = with_train(reference_budget(method=method, bits=bits, **common), changes)
                    rows.append((f"{method.upper()} {bits}-bit MLP-only (ref. budget){tag}", cfg))
    return rows


def run_row(name, cfg, base_model, tokenizer, calib, eval_tokens, args, device) -> dict:
    model = copy.deepcopy(base_model)
    records, report = quantize_model(model, tokenizer, cfg, calib, device, progress=False)
    metrics = evaluate(model, eval_tokens, base=base_model, seqlen=args.seqlen,
                       max_tokens=args.max_tokens, device=str(device))
    kept = sum(k for b in report["blocks"] for s in b["stages"] for k in s.get("kept_init", []))
    row = {"name": name, **metrics, "bpp": report["bpp"], "seconds": report["quantize_seconds"],
           "peak_gib": report["peak_host_rss_gib"], "peak_cuda_gib": report.get("peak_cuda_gib"),
           "stage_runs_kept_init": kept, "config": cfg.to_dict()}
    del model
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-demo")
    p.add_argument("--calib", default=str(SHARED / "calib"))
    p.add_argument("--text", default=str(SHARED / "wikitext2-test.raw"))
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--bits", nargs="+", type=parse_bits, default=[4, 3, 2, "ternary"])
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq", "gsq"])
    p.add_argument("--rows", nargs="+", default=["main", "reference"])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-blocks", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-base", action="store_true", help="skip the base-model row")
    p.add_argument("--json", default=None)
    p.add_argument("--train", nargs="+", default=[], metavar="KEY=VALUE",
                   help="TrainConfig changes for every row, e.g. autocast=bf16 logit_travel=0.07")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="QuantizeConfig changes for every row, e.g. act_order=true")
    p.add_argument("--fused", action="store_true",
                   help="fused Triton sampler on CUDA (sets GSQ_FUSED=1 for this run)")
    args = p.parse_args()
    if args.fused:
        os.environ["GSQ_FUSED"] = "1"
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 evaluation and training, as on CPU
    base_model, tokenizer = load_any_model(args.model)
    calib = calibration_tokens(tokenizer, args.calib)
    eval_tokens = tokenize_text(tokenizer, read_text(args.text))
    rows = []
    if not args.no_base:
        base = evaluate(base_model, eval_tokens, base=base_model, seqlen=args.seqlen,
                        max_tokens=args.max_tokens, device=str(device))
        rows.append({"name": "base (fp32)", **base, "bpp": 32.0})
    for name, cfg in planned_rows(args):
        rows.append(run_row(name, cfg, base_model, tokenizer, calib, eval_tokens, args, device))
        print(format_table(rows), flush=True)
        write_json(args.json, run_meta(device), rows)
    print(format_table(rows))
    print(json.dumps(run_meta(device)))


def write_json(path: str | None, meta: dict, rows: list[dict]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))


def run_meta(device: torch.device) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
            "command": " ".join(sys.argv), "torch": torch.__version__,
            "gsq_fused": os.environ.get("GSQ_FUSED", "0")}


if __name__ == "__main__":
    main()
