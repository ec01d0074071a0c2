"""Peak host memory and wall time of `gsq quantize` against model size (RESULTS.md §11).

Random Llama-shaped models (bf16 safetensors, SmolLM2's tokenizer, weights from
`gsq.models.synthetic.write_random_checkpoint`, written tensor by tensor so that making them needs
little memory) of about 0.5B, 1.3B and 3B parameters are quantized with `--max-blocks 2` and a small
calibration budget, each run in its own process. The peak RSS is the kernel's (`wait4` ru_maxrss:
the process's whole life, loading included); the report's own figures (VmHWM, gsq plan's
prediction) are listed beside it when the gsq under test writes them.

    python benchmarks/scale_memory.py --root /data/scale --json after.json
    python benchmarks/scale_memory.py --root /data/scale --src /tmp/gsq-old/src --tag before \\
        --sizes 0.5b 1.3b --methods gptq --json before.json

`--src` runs another gsq source tree (e.g. an older commit extracted with `git archive`) on the
same models; the models are generated with the gsq this script is run with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name -> Llama shape (hidden, intermediate, layers, heads, kv heads); vocabulary 49,152 (SmolLM2)
SIZES = {
    "0.5b": (1024, 4096, 24, 16, 4),
    "1.3b": (2048, 5632, 24, 32, 4),
    "3b": (3072, 8192, 28, 24, 8),
}
BUDGETS = {
    "gptq": ["--nsamples", "8", "--val-samples", "4", "--gptq-samples", "16", "--seqlen", "256"],
    "gsq": ["--nsamples", "8", "--val-samples", "4", "--gptq-samples", "8", "--seqlen", "128",
            "--batch-size", "4", "--micro-batch-size", "2", "--epochs", "1", "--qk-steps", "20"],
    "rtn": ["--nsamples", "8", "--val-samples", "4", "--gptq-samples", "8", "--seqlen", "256"],
}


def make_model(root: Path, size: str) -> Path:
    """The random model of `size` under `root` (generated on first use)."""
    from gsq.models.synthetic import demo_tokenizer, random_config, write_random_checkpoint

    path = root / f"llama-{size}"
    if (path / "config.json").is_file():
        return path
    hidden, inter, layers, heads, kv = SIZES[size]
    tokenizer = demo_tokenizer()
    config = random_config("llama", len(tokenizer), hidden_size=hidden,
                           intermediate_size=inter, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv,
                           max_position_embeddings=4096)
    print(f"writing {path} ...", flush=True)
    return write_random_checkpoint(path, config, tokenizer, max_shard_bytes=2 << 30)


def run(model: Path, method: str, out: Path, src: Path, max_blocks: int) -> dict:
    """One `gsq quantize` in a child process: its peak RSS (kernel), wall time and report."""
    argv = [sys.executable, "-m", "gsq.cli", "-q", "quantize", str(model), "--method", method,
            "--max-blocks", str(max_blocks), *BUDGETS[method], "--out", str(out), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"gsq quantize failed on {model} ({method}):\n{stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    row = {"model": model.name, "method": method, "blocks": max_blocks,
           "peak_rss_gib": usage.ru_maxrss / 2**20, "wall_seconds": wall,
           "report_peak_gib": report.get("peak_host_rss_gib"),
           "seconds_per_block": sum(b["seconds"] for b in report["blocks"]) / len(report["blocks"]),
           "output_gib": sum(p.stat().st_size for p in out.iterdir()) / 2**30,
           "stdout": stdout.strip()}
    plan = report.get("plan")
    if plan:
        row["predicted_peak_gib"] = plan["predicted"]["peak_host_gib"]
        row["predicted_seconds_per_block"] = plan["predicted"]["seconds_per_block"]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| tag | model | params | method | peak RSS GiB | (plan) | wall s | s/block (plan) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        plan = f"{r['predicted_peak_gib']:.2f}" if "predicted_peak_gib" in r else "-"
        per_block = f"{r['seconds_per_block']:.0f}"
        if "predicted_seconds_per_block" in r:
            per_block += f" ({r['predicted_seconds_per_block']:.0f})"
        lines.append(f"| {r['tag']} | {r['model']} | {r['params_b']:.2f}B | {r['method']} | "
                     f"{r['peak_rss_gib']:.2f} | {plan} | {r['wall_seconds']:.0f} | "
                     f"{per_block} |")
    return "\n".join(lines)


def params(model: Path) -> float:
    from gsq.io.shards import checkpoint_files, read_header

    total = 0
    for path in set(checkpoint_files(model).values()):
        for info in read_header(path).values():
            numel = 1
            for size in info["shape"]:
                numel *= size
            total += numel
    return total / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder for the models and outputs")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=["gptq", "gsq"], choices=list(BUDGETS))
    parser.add_argument("--max-blocks", type=int, default=2)
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"),
                        help="gsq source tree to run (default: this checkout's)")
    parser.add_argument("--tag", default="after")
    parser.add_argument("--json", default=None, help="append the rows to this JSON file")
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    rows = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() \
        else []
    for size in args.sizes:
        model = make_model(root, size)
        for method in args.methods:
            row = run(model, method, root / f"out-{size}-{method}", Path(args.src),
                      args.max_blocks)
            row.update({"tag": args.tag, "size": size, "params_b": params(model),
                        "date": time.strftime("%Y-%m-%d")})
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
