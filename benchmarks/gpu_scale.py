"""Streaming on a GPU machine: a random Llama-3.1-8B-shaped model quantized with GSQ, peak host and
GPU memory against `gsq plan`'s prediction (RESULTS.md §15, issue 12). One command, no network:

    python benchmarks/gpu_scale.py --root /tmp/gsq-8b --json gpu_scale.json

1. writes the model (bf16 safetensors, 16 GB, tensor by tensor; 8,030M parameters: hidden 4096,
   intermediate 14336, 32 blocks, 32 heads, 8 KV heads, vocabulary 128,256; a byte-level
   tokenizer built in-process) unless it is there already;
2. `gsq plan` of the run;
3. `gsq quantize --method gsq --max-blocks 2 --device cuda` in a child process, with the peak RSS
   of its whole life (`wait4`), the peak CUDA allocation from its report, and the GPU memory in
   use (nvidia-smi, polled, context included) while it runs.
Prints one JSON object (also written to --json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
             rope_theta=500000.0)
VOCAB = 128256
BUDGET = ["--preset", "gpu", "--nsamples", "128", "--val-samples", "16", "--gptq-samples", "64",
          "--seqlen", "2048", "--epochs", "4", "--qk-steps", "200"]


def byte_tokenizer():
    """Byte-level BPE without merges (ids 0..255): no download needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def make_model(path: Path) -> Path:
    sys.path.insert(0, str(SRC))
    from gsq.models.synthetic import random_config, write_random_checkpoint

    if (path / "config.json").is_file():
        return path
    t0 = time.perf_counter()
    config = random_config("llama", VOCAB, **SHAPE)
    write_random_checkpoint(path, config, byte_tokenizer(), max_shard_bytes=4 << 30)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path


def gpu_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                              "nounits", "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0")
                              .split(",")[0]], capture_output=True, text=True, timeout=10)
        return int(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def quantize(model: Path, out: Path) -> dict:
    argv = [sys.executable, "-m", "gsq.cli", "-q", "quantize", str(model), "--method", "gsq",
            "--max-blocks", "2", "--device", "cuda", *BUDGET, "--out", str(out), "--overwrite"]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    idle = gpu_used_mib()
    peak_smi = [idle or 0]
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.5):
            used = gpu_used_mib()
            if used is not None:
                peak_smi[0] = max(peak_smi[0], used)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    thread.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"gsq quantize failed:\n{proc.stderr.read().decode()[-4000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"wall_seconds": wall, "peak_host_rss_gib": usage.ru_maxrss / 2**20,
            "report_peak_host_gib": report["peak_host_rss_gib"],
            "peak_cuda_allocated_gib": report.get("peak_cuda_gib"),
            "peak_nvidia_smi_gib": (peak_smi[0] - (idle or 0)) / 1024 if idle is not None
            else None,
            "seconds_per_block": [b["seconds"] for b in report["blocks"]],
            "activations": report.get("activations"), "plan": report.get("plan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/gsq-8b")
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the quantized output")
    args = parser.parse_args()
    root = Path(args.root)
    model = make_model(root / "llama-8b-shape")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    plan_json = root / "plan.json"
    subprocess.run([sys.executable, "-m", "gsq.cli", "-q", "plan", str(model), "--method", "gsq",
                    "--max-blocks", "2", "--device", "cuda", *BUDGET, "--json", str(plan_json)],
                   env=env, check=True)
    result = {"model": "random Llama-3.1-8B shape (bf16)", "budget": " ".join(BUDGET),
              "gsq_plan": json.loads(plan_json.read_text()),
              **quantize(model, root / "out")}
    try:
        import torch

        result["device"] = torch.cuda.get_device_name(0)
    except Exception:  # only a label
        result["device"] = "?"
    result["date"] = time.strftime("%Y-%m-%d")
    if not args.keep:
        shutil.rmtree(root / "out", ignore_errors=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
