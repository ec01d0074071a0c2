"""Does streaming change any result? Quantize the same model with two gsq source trees (e.g. the
last commit before streaming, extracted with `git archive`, and this checkout) and compare the
codes, scales and the weights `gsq.load_quantized` rebuilds, tensor by tensor, bit for bit.

    git archive a930f5a src | tar -x -C /tmp/gsq-before
    python benchmarks/streaming_identity.py --before /tmp/gsq-before/src --root /tmp/ident \\
        --model smollm2-demo --methods gptq gsq --max-blocks 2

Both runs get the same calibration text (--calib, default the bundled book) and the newer one
`--after-flags` (default `--e2e-epochs 0`: the end-to-end stage came after streaming).
Identical codes and weights mean identical perplexity, KL and top-1 numbers for any evaluation of
the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

AFTER = Path(__file__).resolve().parents[1] / "src"


def quantize(src: Path, model: str, method: str, max_blocks: int, out: Path, calib: str,
             extra: list[str]) -> None:
    argv = [sys.executable, "-m", "gsq.cli", "-q", "quantize", model, "--method", method,
            "--bits", "2", "--group-size", "64", "--max-blocks", str(max_blocks), "--calib",
            calib, "--out", str(out), "--overwrite", *extra]
    subprocess.run(argv, env={**os.environ, "PYTHONPATH": str(src)}, check=True)


def compare(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    from gsq.models.quantized import load_quantized

    codes_a, codes_b = (load_file(str(p / "gsq_codes.safetensors")) for p in (a, b))
    model_a, _, _ = load_quantized(a)
    model_b, _, _ = load_quantized(b)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    return {
        "codes_tensors": len(codes_a),
        "codes_identical": codes_a.keys() == codes_b.keys()
        and all(torch.equal(codes_a[k], codes_b[k]) for k in codes_a),
        "weights": len(state_a),
        "weights_identical": state_a.keys() == state_b.keys()
        and all(torch.equal(state_a[k], state_b[k]) for k in state_a),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="src/ of the older gsq")
    parser.add_argument("--after", default=str(AFTER), help="src/ of the newer gsq (this one)")
    parser.add_argument("--root", required=True)
    parser.add_argument("--model", default="smollm2-demo")
    parser.add_argument("--methods", nargs="+", default=["gptq", "gsq"])
    parser.add_argument("--max-blocks", type=int, default=2)
    parser.add_argument("--calib", default=str(AFTER / "gsq" / "data" / "bundled" / "pg1342.txt"),
                        help="the same calibration text for both (default: the bundled book)")
    parser.add_argument("--after-flags", default="--e2e-epochs 0",
                        help="flags only the newer gsq takes, e.g. to switch off stages the "
                             "older one did not have")
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods:
        outs = {tag: root / f"{tag}-{method}" for tag in ("before", "after")}
        quantize(Path(args.before), args.model, method, args.max_blocks, outs["before"],
                 args.calib, [])
        quantize(Path(args.after), args.model, method, args.max_blocks, outs["after"],
                 args.calib, args.after_flags.split())
        rows.append({"model": args.model, "method": method, "blocks": args.max_blocks,
                     **compare(outs["before"], outs["after"])})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
