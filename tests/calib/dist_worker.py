"""One process of a `torchrun` launch for tests/calib/test_dist.py (not a test module itself).

    torchrun ... dist_worker.py records OUT      tiny Llama, Qwen3-MoE and Mixtral, GSQ and GPTQ,
                                                 in memory
                                                 (`gsq.api.quantize_model`); rank r saves its
                                                 records and stage reports to OUT.rank<r>
    torchrun ... dist_worker.py cli ARGS...      `gsq ARGS...`
    torchrun ... dist_worker.py fail ARGS...     `gsq ARGS...` where rank 1 raises in block 1
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's builders

from conftest import build_tiny_llama, build_tiny_moe  # noqa: E402

from gsq.config import E2EConfig, QuantizeConfig  # noqa: E402
from gsq.quant.trainer import TrainConfig  # noqa: E402

SEQLEN = 16


def case_config(method: str, e2e: bool, moe_min_tokens: int = 8) -> QuantizeConfig:
    """Two micro-batches per optimiser step and two GPTQ chunks: with two processes each sum
    over ranks adds two partial sums, as one process does (see test_dist's module doc). GSQ
    keeps its last epoch (not the best of init and epochs), so that its codes are the trained
    ones even where 2 steps do not beat GPTQ."""
    return QuantizeConfig(method=method, bits=2, group_size=32, nsamples=8, val_samples=2,
                          gptq_samples=4, seqlen=SEQLEN, qk_steps=4, moe_min_tokens=moe_min_tokens,
                          train=TrainConfig(epochs=1, batch_size=4, micro_batch_size=2,
                                            keep_best=False),
                          e2e=E2EConfig(epochs=1 if e2e else 0, batch_size=4,
                                        micro_batch_size=2))


# MoE experts routed 10-44 of the 64 GPTQ tokens x 2: at 32, experts of both ranks are starved
# in both blocks (pooled Hessians; GSQ keeps their init), one alone in Qwen3-MoE's block 1.
STARVED = 32
CASES = {  # name -> (model builder, method, e2e stage on, moe_min_tokens)
    "llama-gsq": (lambda: build_tiny_llama(0), "gsq", True, 8),
    "llama-gptq": (lambda: build_tiny_llama(0), "gptq", False, 8),
    "qwen3_moe-gsq": (lambda: build_tiny_moe("qwen3_moe"), "gsq", False, 8),
    "qwen3_moe-gptq": (lambda: build_tiny_moe("qwen3_moe"), "gptq", False, 8),
    "qwen3_moe-gsq-starved": (lambda: build_tiny_moe("qwen3_moe"), "gsq", False, STARVED),
    "mixtral-gptq-starved": (lambda: build_tiny_moe("mixtral"), "gptq", False, STARVED),
}


def calib_tokens() -> torch.Tensor:
    return torch.randint(0, 256, (20 * SEQLEN,), generator=torch.Generator().manual_seed(0))


def run_case(name: str) -> dict:
    """{"records": {module: (codes, scale)}, "val": per stage its held-out losses (initial,
    final) and per epoch (train loss, held-out hard and soft losses), "ranks": the report's
    per-process entries,
    "e2e": (train KL, held-out KL) per epoch of the end-to-end scale stage,
    "moe": per MoE stage (experts solved by this process, experts that fell back)}."""
    from gsq.api import quantize_model

    build, method, e2e, min_tokens = CASES[name]
    records, report = quantize_model(build(), None, case_config(method, e2e, min_tokens),
                                     calib_tokens(), torch.device("cpu"), progress=False)
    stages = [s for b in report["blocks"] for s in b["stages"]]
    return {"records": {n: (qw.codes, qw.scale) for n, qw in records.items()},
            "val": [(s.get("val_loss_init"), s.get("val_loss_final"),
                     [[(h["train_loss"], h["val_hard"], h["val_soft"]) for h in run]
                      for run in s.get("history", [])])
                    for s in stages],
            "e2e": [(h["train_kl"], h["val_kl"]) for h in report["e2e"]["history"]]
            if "e2e" in report else None,
            "ranks": report["ranks"],
            "moe": [(s["experts_solved"], [e["expert"] for e in s["experts"] if e["fallback"]])
                    for s in stages if "experts" in s]}


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    mode, rest = argv[0], argv[1:]
    if mode == "records":
        from gsq import dist

        with dist.launched(torch.device("cpu")) as world:
            out = {name: run_case(name) for name in CASES}
            torch.save(out, f"{rest[0]}.rank{world.rank}")
        return 0
    from gsq.cli.__main__ import main as gsq_main

    if mode == "fail":
        import gsq.calib.sequential as sequential
        from gsq import dist
        from gsq.errors import GSQError

        quantize_block = sequential.quantize_block

        def failing(block, index, *args, **kwargs):
            if index == 1 and dist.world().rank == 1:
                raise GSQError("injected failure on rank 1")
            return quantize_block(block, index, *args, **kwargs)

        sequential.quantize_block = failing
    return gsq_main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
