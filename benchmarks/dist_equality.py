"""1 against N gloo processes on tiny random models (`gsq.dist`): how equal, and how long.

    python benchmarks/dist_equality.py --nproc 2 --json benchmarks/results/dist-equality.json

For each budget ("2 parts": two micro-batches per optimiser step and two GPTQ chunks, where every
sum over two ranks is exact; "4 parts": four of each, where the two-level grouping of the sums
differs from one process's), model (random Llama and Qwen3-MoE, 2 blocks, hidden 64) and method
(GSQ keeping its last epoch, with the e2e stage; GPTQ), the script launches
`torchrun --nproc-per-node K` of itself for K = 1 and N, each process running every case in
memory (`gsq.api.quantize_model`, one thread per process), and compares rank 0's records with the
single process's: identical tensors, the fraction of equal codes, the largest relative scale
difference, and every training and held-out loss of the report. Wall times are of whole launches
(imports included) on whatever machine runs it; they measure correctness runs, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SEQLEN = 16
BUDGETS = {"2 parts": 2, "4 parts": 4}  # micro-batches per step = GPTQ chunks
MODELS = ("llama", "qwen3_moe")
METHODS = ("gsq", "gptq")


def _config(method: str, parts: int):
    from gsq.config import E2EConfig, QuantizeConfig
    from gsq.quant.trainer import TrainConfig

    return QuantizeConfig(method=method, bits=2, group_size=32, nsamples=4 * parts,
                          val_samples=2, gptq_samples=2 * parts, seqlen=SEQLEN, qk_steps=4,
                          moe_min_tokens=8,
                          train=TrainConfig(epochs=1, batch_size=2 * parts, micro_batch_size=2,
                                            keep_best=False),
                          e2e=E2EConfig(epochs=1 if method == "gsq" else 0,
                                        batch_size=2 * parts, micro_batch_size=2))


def _worker(out: str) -> None:
    """One process of a launch: every case, records saved by rank 0."""
    from gsq import dist
    from gsq.api import quantize_model
    from gsq.models.synthetic import build_random_model, random_config

    torch.set_num_threads(1)
    results = {}
    with dist.launched(torch.device("cpu")) as world:
        for budget, parts in BUDGETS.items():
            tokens = torch.randint(0, 256, ((6 * parts + 4) * SEQLEN,),
                                   generator=torch.Generator().manual_seed(0))
            for arch in MODELS:
                for method in METHODS:
                    model = build_random_model(random_config(arch, 256), seed=0)
                    records, report = quantize_model(model, None, _config(method, parts), tokens,
                                                     torch.device("cpu"), progress=False)
                    results[f"{budget}|{arch}|{method}"] = {
                        "records": {n: (qw.codes, qw.scale) for n, qw in records.items()},
                        "losses": _losses(report)}
        if world.is_main:
            torch.save(results, out)


def _losses(report: dict) -> list[float]:
    """Every held-out and training loss of the run: per stage its initial and final held-out
    loss and per epoch (train, held-out hard, held-out soft); the e2e stage's (train, held-out)
    KL per epoch."""
    out = []
    for block in report["blocks"]:
        for stage in block["stages"]:
            out += [*stage.get("val_loss_init", []), *stage.get("val_loss_final", [])]
            for run in stage.get("history", []):
                for h in run:
                    out += [h["train_loss"], h["val_hard"], h["val_soft"]]
    for h in report.get("e2e", {}).get("history", []):
        out += [h["train_kl"], h["val_kl"]]
    return out


def _launch(nproc: int, out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc}", __file__, "--worker", str(out)],
                   env=env, check=True)
    return time.perf_counter() - t0


def _compare(one: dict, many: dict) -> dict:
    codes_equal = codes_total = tensors_equal = 0
    scale_rel = 0.0
    for name, (codes, scale) in one["records"].items():
        c2, s2 = many["records"][name]
        tensors_equal += int(torch.equal(codes, c2) and torch.equal(scale, s2))
        codes_equal += int((codes == c2).sum())
        codes_total += codes.numel()
        rel = ((scale.float() - s2.float()).abs() / scale.float().abs().clamp(min=1e-12)).max()
        scale_rel = max(scale_rel, float(rel))
    return {"tensors": len(one["records"]), "tensors_identical": tensors_equal,
            "codes_equal_fraction": codes_equal / codes_total, "scale_max_rel_diff": scale_rel,
            "losses": len(one["losses"]),
            "losses_identical": sum(a == b for a, b in zip(one["losses"], many["losses"],
                                                           strict=True)),
            "losses_max_rel_diff": max((abs(a - b) / max(abs(a), 1e-30)
                                        for a, b in zip(one["losses"], many["losses"],
                                                        strict=True)), default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        wall = {k: _launch(k, Path(tmp) / f"n{k}.pt") for k in (1, args.nproc)}
        one, many = (torch.load(Path(tmp) / f"n{k}.pt") for k in (1, args.nproc))
    rows = {case: _compare(one[case], many[case]) for case in one}
    result = {"nproc": args.nproc, "wall_seconds": wall, "cases": rows,
              "torch": torch.__version__}
    for case, row in rows.items():
        print(f"{case:28s} identical {row['tensors_identical']}/{row['tensors']}  codes equal "
              f"{row['codes_equal_fraction']:.6f}  scale max rel diff "
              f"{row['scale_max_rel_diff']:.2e}  losses identical {row['losses_identical']}/"
              f"{row['losses']} (max rel diff {row['losses_max_rel_diff']:.2e})")
    print(f"wall seconds: {wall}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
