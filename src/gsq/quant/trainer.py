"""Optimise quantizers against a loss closure (method §6, §18.3, §21).

The trainer never sees a model: it receives quantizers and an `Objective` that maps soft or hard
weights (by name) to a loss on a batch of training samples, or to a held-out validation loss.

Per optimiser step: τ, κ and the learning rate are fixed; the step's samples are split into
micro-batches, each draws fresh noise (its index is part of the noise seed) and accumulates its
share of the gradient; then one Lion step. After every epoch the held-out *hard* loss is measured.
Under several processes (`gsq.dist`) each runs its share of a step's micro-batches (by their index
in the step, which also seeds their noise), the gradients and the loss are summed over processes
and every process takes the same step; held-out losses are computed by every process and rank 0's
are used, so all keep the same assignment.
The held-out hard loss of the initial assignment (GPTQ/RTN codes) is measured first, and the best
of {init, epoch 1..E} is returned, so the result is never worse than its start on held-out data.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from lion_pytorch import Lion
from torch import Tensor

from gsq import dist
from gsq.kernels import lion_uses_triton
from gsq.quant.noise import derive_seed
from gsq.quant.quantizers import LogitQuantizer
from gsq.quant.schedule import DEFAULT_LOGIT_TRAVEL, Schedule, budget_aware_lr
from gsq.quant.types import QuantizedWeight

log = logging.getLogger(__name__)

_VAL_NOISE_STEP = 0x7FFF_FFFF  # fixed noise identity of the soft validation loss


class Objective(Protocol):
    """What the trainer needs from a stage: a training loss and a held-out loss."""

    n_train: int  # number of training samples (sequences)
    dtype: torch.dtype  # dtype of the weights fed to the loss

    def loss(self, weights: dict[str, Tensor], indices: Tensor) -> Tensor:
        """Mean loss of the samples `indices` with the given weights (differentiable)."""

    def val_loss(self, weights: dict[str, Tensor]) -> float:
        """Mean held-out loss with the given weights."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20  # passes over the training samples (paper: 20 for Llama/Qwen)
    batch_size: int = 64  # samples per optimiser step
    micro_batch_size: int = 8  # samples per forward; fresh noise for each
    logit_lr: float = 1e-4  # Lion lr of the logits (paper)
    scale_lr: float = 5e-5  # Lion lr of the scales (paper), no weight decay
    weight_decay: float = 1.0  # decoupled, logits only
    betas: tuple[float, float] = (0.9, 0.95)
    lr_final_frac: float = 0.1  # cosine decay to this fraction of the lr
    cosine: bool = True  # False: constant lr (the Q/K quadratic stage)
    tau: tuple[float, float] = (2.0, 0.05)
    kappa: tuple[float, float] = (100.0, 500.0)
    # Budget-aware logit lr: the lr is raised (never lowered) so that a logit can travel this far
    # over the run (method §21); at the paper's budget the lr stays 1e-4. None = fixed logit_lr.
    logit_travel: float | None = DEFAULT_LOGIT_TRAVEL
    keep_best: bool = True  # return the best of init and every epoch by held-out hard loss
    # "reshuffle": new per-sample order each epoch; "chunks": fixed chunks
    batching: str = "reshuffle"
    # Mixed precision of the stage forward/backward: None = the model's dtype, "bf16"/"fp16" =
    # torch.autocast (matmuls in 16 bit, losses, logits, noise and scales stay fp32)
    autocast: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch sizes >= 1")
        if self.batching not in ("reshuffle", "chunks"):
            raise ValueError(f"batching must be 'reshuffle' or 'chunks'; got {self.batching!r}")
        if self.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16'; got {self.autocast!r}")


@dataclass
class TrainResult:
    results: dict[str, QuantizedWeight]  # the chosen hard assignment per quantizer
    init_val: float  # held-out hard loss of the initial assignment
    best_val: float  # held-out hard loss of the chosen assignment
    best_epoch: int  # 0 = the initial assignment was kept
    steps: int
    logit_lr: float
    history: list[dict] = field(default_factory=list)  # per epoch: val_hard, val_soft, train_loss


def _epoch_order(n: int, epoch: int, cfg: TrainConfig, gen: torch.Generator) -> Tensor:
    if cfg.batching == "reshuffle":
        return torch.randperm(n, generator=gen)
    # "chunks": fixed chunks of batch_size consecutive samples, order of the full chunks shuffled;
    # a partial last chunk stays last (the epoch drops it: it would not make a full batch)
    full = n // cfg.batch_size
    chunks = torch.arange(full * cfg.batch_size).view(full, cfg.batch_size)
    order = chunks[torch.randperm(full, generator=gen)].flatten()
    return torch.cat([order, torch.arange(full * cfg.batch_size, n)])


def _hard_weights(results: dict[str, QuantizedWeight], dtype: torch.dtype) -> dict[str, Tensor]:
    return {name: r.dequantize(dtype) for name, r in results.items()}


def _soft_weights(quantizers: dict[str, LogitQuantizer], tau: float, kappa: float, seed: int,
                  step: int, micro: int, dtype: torch.dtype) -> dict[str, Tensor]:
    return {name: q.soft(tau, kappa, derive_seed(seed, qi, step, micro), dtype)
            for qi, (name, q) in enumerate(quantizers.items())}


def make_optimizer(quantizers: dict[str, LogitQuantizer], cfg: TrainConfig, logit_lr: float,
                   use_triton: bool | None = None) -> Lion:
    """Lion over the logits (`logit_lr`, decoupled weight decay) and the scales (`cfg.scale_lr`,
    no decay); lion_pytorch's Triton update where the logits are on CUDA, unless `use_triton`
    says otherwise (the GPU benchmark times both)."""
    groups = [
        {"params": [q.logits for q in quantizers.values()], "lr": logit_lr,
         "weight_decay": cfg.weight_decay},
        {"params": [q.scale for q in quantizers.values()], "lr": cfg.scale_lr, "weight_decay": 0.0},
    ]
    if use_triton is None:
        use_triton = lion_uses_triton(q.logits for q in quantizers.values())
    return Lion(groups, lr=logit_lr, betas=cfg.betas, use_triton=use_triton)


def train_quantizers(quantizers: dict[str, LogitQuantizer], objective: Objective, cfg: TrainConfig,
                     seed: int, progress: bool = False, desc: str = "") -> TrainResult:
    """Train `quantizers` jointly on `objective`; returns the best hard assignment
    (see module doc)."""
    n = objective.n_train
    batch = min(cfg.batch_size, n)
    per_epoch = n // batch
    sched = Schedule(cfg.epochs * per_epoch, cfg.tau, cfg.kappa, cfg.lr_final_frac, cfg.cosine)
    logit_lr = budget_aware_lr(cfg.logit_lr, sched, cfg.logit_travel)
    opt = make_optimizer(quantizers, cfg, logit_lr)
    base_lrs = [g["lr"] for g in opt.param_groups]
    init = {name: q.init for name, q in quantizers.items()}
    best, best_epoch = init, 0
    (init_val,) = dist.from_rank0([objective.val_loss(_hard_weights(init, objective.dtype))])
    best_val = init_val
    world = dist.world()
    params = [p for group in opt.param_groups for p in group["params"]]
    gen = torch.Generator().manual_seed(derive_seed(seed, 0xBA7C))
    history: list[dict] = []
    bar = _progress_bar(sched.total_steps, progress, desc)
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        t0, order, losses = time.perf_counter(), _epoch_order(n, epoch, cfg, gen), []
        for b in range(per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            tau, kappa, factor = sched.tau_at(step), sched.kappa_at(step), sched.lr_factor(step)
            for group, base in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), dtype=torch.float32)
            for m, micro in enumerate(idx.split(cfg.micro_batch_size)):
                if not world.owns(m):
                    continue
                weights = _soft_weights(quantizers, tau, kappa, seed, step, m, objective.dtype)
                loss = objective.loss(weights, micro) * (len(micro) / len(idx))
                loss.backward()
                # summed on the loss's device: one host sync per step, not per micro-batch
                total = total.to(loss.device) + loss.detach().float()
            if world.size > 1:
                total = total.to(params[0].device)
                dist.sum_gradients(params, total)
            total = float(total)
            if not math.isfinite(total):
                raise FloatingPointError(f"non-finite training loss at step {step}")
            opt.step()
            losses.append(total)
            step += 1
            bar.update(1)
        hard = {name: q.hard_result() for name, q in quantizers.items()}
        val_hard = objective.val_loss(_hard_weights(hard, objective.dtype))
        with torch.no_grad():
            val_soft = objective.val_loss(
                _soft_weights(quantizers, tau, kappa, seed, _VAL_NOISE_STEP, 0, objective.dtype))
        val_hard, val_soft = dist.from_rank0([val_hard, val_soft])
        if not (val_hard == val_hard):  # NaN
            raise FloatingPointError(f"non-finite validation loss after epoch {epoch}")
        history.append({"epoch": epoch, "train_loss": sum(losses) / max(len(losses), 1),
                        "val_hard": val_hard, "val_soft": val_soft,
                        "seconds": time.perf_counter() - t0})
        if not cfg.keep_best or val_hard < best_val:
            best, best_val, best_epoch = hard, val_hard, epoch
    bar.close()
    return TrainResult(best, init_val, best_val, best_epoch, step, logit_lr, history)


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False, unit="step")
