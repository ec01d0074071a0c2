"""Peak host memory and wall time of `gsq quantize` against model size (benchmarks/RESULTS.md,
"Scale: peak memory vs model size").

Random Llama-shaped models (bf16 safetensors, SmolLM2's tokenizer, weights from
`gsq.models.synthetic.write_random_checkpoint`, written tensor by tensor so that making them needs
little memory) of about 0.5B, 1.3B and 3B parameters are quantized with the cpu preset and a small
calibration budget (BUDGETS), each run in its own process under `/usr/bin/time -v`, one at a time.
The peak RSS is the kernel's ("Maximum resident set size": the process's whole life, loading
included); the report's own figure (VmHWM) and `gsq plan`'s prediction (run in a separate process
with the same flags before the quantize run) are listed beside it. GSQ runs have the end-to-end
scale stage off: it loads the whole model after the block loop (`gsq plan` reports its size).

    python benchmarks/scale_memory.py --root /data/scale --runs 0.5b:gptq:all 3b:gsq:2 \
        --json after.json
    python benchmarks/scale_memory.py --root /data/scale --src /tmp/gsq-old/src --tag before \
        --runs 1.3b:rtn:2 --json before.json

`--src` runs another gsq source tree (e.g. an older commit extracted with `git archive`) on the
same models; the models are generated with the gsq this script is run with.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
            "--batch-size", "4", "--micro-batch-size", "2", "--epochs", "1", "--qk-steps", "20",
            "--e2e-epochs", "0"],
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


def flags(method: str, max_blocks: int | None, extra: list[str]) -> list[str]:
    blocks = ["--max-blocks", str(max_blocks)] if max_blocks else []
    return ["--preset", "cpu", "--method", method, *blocks, *BUDGETS[method], *extra]


def predict(model: Path, method: str, max_blocks: int | None, src: Path,
            extra: list[str]) -> dict | None:
    """`gsq plan` of the run, in its own process (None if this gsq has no `plan`)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plan.json"
        argv = [sys.executable, "-m", "gsq.cli", "-q", "plan", str(model),
                *flags(method, max_blocks, extra), "--json", str(path)]
        done = subprocess.run(argv, env={**os.environ, "PYTHONPATH": str(src)},
                              capture_output=True, text=True)
        return json.loads(path.read_text()) if done.returncode == 0 else None


def max_rss_gib(time_output: str) -> float:
    """"Maximum resident set size (kbytes)" of `/usr/bin/time -v`, in GiB."""
    for line in time_output.splitlines():
        if "Maximum resident set size" in line:
            return int(line.rsplit(":", 1)[1]) / 2**20
    raise ValueError("no maximum resident set size in the /usr/bin/time output")


def run(model: Path, method: str, out: Path, src: Path, max_blocks: int | None,
        extra: list[str]) -> dict:
    """One `gsq quantize` in a child process under /usr/bin/time -v: its peak RSS, wall time,
    report, `gsq plan`'s prediction and the machine's load average before and after (other
    processes on the machine slow the run, not its memory)."""
    import tempfile

    plan = predict(model, method, max_blocks, src, extra)
    argv = [sys.executable, "-m", "gsq.cli", "-q", "quantize", str(model),
            *flags(method, max_blocks, extra), "--out", str(out), "--overwrite"]
    load_before = os.getloadavg()[1]
    env = {**os.environ, "PYTHONPATH": str(src)}
    with tempfile.NamedTemporaryFile("r", suffix=".time") as timing:
        t0 = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-v", "-o", timing.name, *argv], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"gsq quantize failed on {model} ({method}):\n{done.stderr[-3000:]}")
        peak = max_rss_gib(Path(timing.name).read_text())
    report = json.loads((out / "report.json").read_text())
    row = {"model": model.name, "method": method, "blocks": report["blocks_quantized"],
           "blocks_total": report["blocks_total"], "peak_rss_gib": peak, "wall_seconds": wall,
           "report_peak_gib": report.get("peak_host_rss_gib"),
           "activations": report.get("activations"),
           "seconds_per_block": sum(b["seconds"] for b in report["blocks"]) / len(report["blocks"]),
           "output_gib": sum(p.stat().st_size for p in out.iterdir()) / 2**30,
           "stdout": done.stdout.strip(), "extra_flags": extra,
           "load_average_5min": [round(load_before, 2), round(os.getloadavg()[1], 2)]}
    if plan:
        row.update({"plan_peak_gib": plan["peak_host_gib"],
                    "plan_seconds_per_block": plan["seconds_per_block"],
                    "plan_output_gib": plan["disk_output_gib"]})
    in_run = report.get("plan")
    if in_run:
        row["report_plan_peak_gib"] = in_run["predicted"]["peak_host_gib"]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| tag | model | params | method | blocks | peak RSS GiB (plan) | report VmHWM GiB | "
             "wall s | s/block (plan) | output GiB (plan) |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def pair(row, key, plan_key, fmt):
        text = format(row[key], fmt)
        return text + (f" ({format(row[plan_key], fmt)})" if plan_key in row else "")

    for r in rows:
        vmhwm = f"{r['report_peak_gib']:.2f}" if r.get("report_peak_gib") else "-"
        lines.append(f"| {r['tag']} | {r['model']} | {r['params_b']:.2f}B | {r['method']} | "
                     f"{r['blocks']}/{r['blocks_total']} | "
                     f"{pair(r, 'peak_rss_gib', 'plan_peak_gib', '.2f')} | {vmhwm} | "
                     f"{r['wall_seconds']:.0f} | "
                     f"{pair(r, 'seconds_per_block', 'plan_seconds_per_block', '.0f')} | "
                     f"{pair(r, 'output_gib', 'plan_output_gib', '.2f')} |")
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
    parser.add_argument("--runs", nargs="+", default=[f"{s}:{m}:2" for s in SIZES
                                                      for m in ("gptq", "gsq")],
                        help="SIZE:METHOD:BLOCKS ('all' for every block), run in this order")
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"),
                        help="gsq source tree to run (default: this checkout's)")
    parser.add_argument("--tag", default="after")
    parser.add_argument("--keep", action="store_true", help="keep the quantized outputs")
    parser.add_argument("--json", default=None, help="append the rows to this JSON file")
    parser.add_argument("--extra", default="",
                        help="more quantize/plan flags for every run, e.g. '--scale-search absmax'")
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    rows = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() \
        else []
    for spec in args.runs:
        size, method, blocks = spec.split(":")
        if size not in SIZES or method not in BUDGETS:
            raise SystemExit(f"bad run '{spec}': SIZE in {list(SIZES)}, METHOD in {list(BUDGETS)}")
        model = make_model(root, size)
        out = root / f"out-{size}-{method}"
        row = run(model, method, out, Path(args.src), None if blocks == "all" else int(blocks),
                  args.extra.split())
        row.update({"tag": args.tag, "size": size, "params_b": params(model),
                    "date": time.strftime("%Y-%m-%d")})
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
        if not args.keep:
            shutil.rmtree(out)
    print(table(rows))


if __name__ == "__main__":
    main()
