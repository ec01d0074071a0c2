"""End-to-end scale stage (method §12): after the block loop, the group scales (and optionally the
RMSNorm weights) of the whole quantized model are trained, codes frozen, on
KL(full precision || quantized) of the next-token distribution over the training windows.

Teacher. The full-precision model runs once (`capture_teacher`), block by block over the train
and val windows: before the block loop for a model quantized in memory (`gsq.api.quantize_model`),
or loaded from the source after a streamed run (`gsq.api.finetune_output`). It keeps the final
hidden state after the final norm,
`(N, T, hidden)` on the host, and the teacher's logits are recomputed per micro-batch with the LM
head (which the stage never trains). The KL is then exact over the whole vocabulary at the memory
of one hidden state per token: full logits would take vocab x tokens (49152 x 16,384 fp32 = 3.2 GB
for SmolLM2 at the cpu preset, 100 GB at the gpu preset), and a top-k cache is an approximation.
The cost is one extra LM-head matmul per micro-batch.

Student. Every quantized linear's weight is re-parametrised as `project(s0 * m) * codes`
(`torch.nn.utils.parametrize`), `m` `(out, n_groups)` starting at 1 and `project` the scale's
storage (bf16 rounding, or a GGUF target's lattice) with a straight-through gradient. The forward
thus always sees storable scales, and the result kept is exactly what is saved: records stay
`scale * codes`. Lion steps on `m` are relative: every step moves a scale by lr x its input value,
whatever its size. Norm weights (`norms=True`) become `w0 * m` the same way (kept in fp32).

Forward. A per-block loop: embeddings -> blocks through the adapter -> final norm -> KL on token
chunks (`_KL_CHUNK`, checkpointed when there are several). That is the shape of a block-streamed
run: with the block inputs kept at block boundaries, the backward can be replayed block by block
(each block's forward recomputed) with one block's weights resident at a time, and the teacher
already runs one block at a time. This version keeps the whole quantized model on the device and
lets autograd hold the activations, so it needs the model in memory.

Acceptance. The held-out KL on the val windows is measured for the input scales and after every
epoch; the best of {input, epoch 1..E} is kept, so the stage never returns a model with a higher
held-out KL than its input.

GGUF targets. Scales of a record with a target are trained on that type's lattice (its
projection in the forward). A K-type record whose lattice is not at hand (records read back from
disk do not carry it) keeps its scales and is listed in the report under `frozen`.

MoE experts. Their weights are slices of fused 3-D parameters, not modules to parametrise: the
stage keeps their scales (listed under `frozen`) and trains the other linears' (and the norms).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lion_pytorch import Lion
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from gsq import dist
from gsq.calib.capture import capture_block_context, capture_block_inputs
from gsq.calib.objectives import map_batches
from gsq.config import QuantizeConfig
from gsq.errors import GSQError
from gsq.models.base import ModelAdapter
from gsq.quant.grids import to_bf16_grid
from gsq.quant.lattice import Fp16Lattice, project_ste
from gsq.quant.noise import derive_seed
from gsq.quant.schedule import Schedule
from gsq.quant.target import target_type
from gsq.quant.types import QuantizedWeight

log = logging.getLogger(__name__)

_KL_CHUNK = 2048  # tokens per LM-head + KL chunk: 2048 x 49152 fp32 logits = 400 MB
_ORDER_SEED = 0xE2E


@dataclass
class Teacher:
    """The full-precision model's final hidden states after the final norm, `(N, T, hidden)`, on
    the train and val windows (host memory)."""

    train: Tensor
    val: Tensor
    seconds: float


@torch.no_grad()
def capture_teacher(model: nn.Module, adapter: ModelAdapter, windows: dict[str, Tensor],
                    cfg: QuantizeConfig, device: torch.device) -> Teacher:
    """Run the (still full-precision) model over the train and val windows `(N, T)`, one block on
    the device at a time, and keep its normed final hidden states on the host."""
    t0 = time.perf_counter()
    micro = cfg.e2e.micro_batch_size
    for module in adapter.embedding_modules(model):
        module.to(device)
    ctx = capture_block_context(model, adapter, cfg.seqlen, device)
    hidden = {s: capture_block_inputs(model, adapter, ids, device, micro).cpu()
              for s, ids in stage_windows(windows, cfg).items()}
    for block in adapter.blocks(model):
        with _on_device(block, device):
            for s, h in hidden.items():
                hidden[s] = map_batches(lambda x, b=block: adapter.block_forward(b, x, ctx), h,
                                        micro, device)
    with _on_device(adapter.final_norm(model), device) as norm:
        hidden = {s: map_batches(norm, h, micro, device) for s, h in hidden.items()}
    return Teacher(hidden["train"], hidden["val"], time.perf_counter() - t0)


def stage_windows(windows: dict[str, Tensor], cfg: QuantizeConfig) -> dict[str, Tensor]:
    """The stage's train windows (the first `cfg.e2e.windows` of the train split) and val."""
    return {"train": windows["train"][: cfg.e2e.windows], "val": windows["val"]}


@contextlib.contextmanager
def _on_device(module: nn.Module, device: torch.device):
    """`module` moved to `device` for the block and back to where it was afterwards."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


# --------------------------------------------------------------------------------------------
# Parametrisations: weight = project(s0 * m) * codes, norm = w0 * m


class _Bf16:
    """Storage of plain records: the bf16 grid."""

    @staticmethod
    def project(scale: Tensor) -> Tensor:
        return to_bf16_grid(scale)


class _ScaledCodes(nn.Module):
    """m `(out, n_groups)` -> project(s0 * m) repeated over each group, times the frozen codes."""

    def __init__(self, qw: QuantizedWeight, storage) -> None:
        super().__init__()
        self.register_buffer("codes", qw.codes.float())
        self.register_buffer("s0", qw.scale.float())
        self.group_size = qw.spec.group_size
        self.storage = storage

    def scale(self, m: Tensor) -> Tensor:
        return project_ste(self.s0 * m, self.storage)

    def forward(self, m: Tensor) -> Tensor:
        return self.scale(m).repeat_interleave(self.group_size, dim=1) * self.codes

    def right_inverse(self, weight: Tensor) -> Tensor:
        return torch.ones_like(self.s0)


class _ScaledNorm(nn.Module):
    """m `(hidden,)` -> w0 * m."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("w0", weight.detach().float().clone())

    def forward(self, m: Tensor) -> Tensor:
        return self.w0 * m

    def right_inverse(self, weight: Tensor) -> Tensor:
        return torch.ones_like(self.w0)


def scale_storage(qw: QuantizedWeight):
    """What `qw`'s scales are rounded to when stored (an object with `project`), or None if it
    cannot be known here (a K-type target without its lattice)."""
    if qw.spec.target is None:
        return _Bf16
    if qw.lattice is not None:
        return qw.lattice
    return None if target_type(qw.spec.target).is_k else Fp16Lattice(qw.spec)


def _attach(module: nn.Module, parametrization: nn.Module) -> nn.Parameter:
    parametrize.register_parametrization(module, "weight", parametrization, unsafe=True)
    multiplier = module.parametrizations.weight.original
    multiplier.requires_grad_(True)
    return multiplier


def _detach(module: nn.Module) -> None:
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    module.weight.requires_grad_(False)


@dataclass
class _Trainable:
    """The multipliers of the run: scales by record name, norms by module name."""

    scales: dict[str, nn.Parameter]
    norms: dict[str, nn.Parameter]
    frozen: list[str]

    def params(self) -> list[nn.Parameter]:
        return [*self.scales.values(), *self.norms.values()]

    def snapshot(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params()]

    def restore(self, values: list[Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params(), values, strict=True):
                p.copy_(v)


def _parametrize(model: nn.Module, adapter: ModelAdapter, records: dict[str, QuantizedWeight],
                 norms: bool, device: torch.device) -> _Trainable:
    scales, frozen = {}, []
    experts = set(adapter.expert_linears(model))  # slices of fused MoE parameters: kept as is
    for name, qw in records.items():
        storage = scale_storage(qw)
        if storage is None or name in experts:
            frozen.append(name)
            continue
        if hasattr(storage, "to"):
            storage = storage.to(device)
        scales[name] = _attach(model.get_submodule(name), _ScaledCodes(qw.to(device), storage))
    norm_params = {}
    if norms:
        for name, module in adapter.norm_modules(model).items():
            norm_params[name] = _attach(module, _ScaledNorm(module.weight))
    return _Trainable(scales, norm_params, frozen)


def _release(model: nn.Module, records: dict[str, QuantizedWeight],
             trainable: _Trainable) -> dict[str, QuantizedWeight]:
    """Remove the parametrisations; the records with their final scales, written into the model
    as `scale * codes` exactly."""
    out = dict(records)
    with torch.no_grad():
        for name, m in trainable.scales.items():
            module = model.get_submodule(name)
            par = module.parametrizations.weight[0]
            scale = par.scale(m).detach().cpu().clone()  # the projected (stored) value
            qw = records[name]
            out[name] = QuantizedWeight(qw.codes, scale, qw.spec, lattice=qw.lattice)
            _detach(module)
            module.weight.copy_(out[name].dequantize(module.weight.dtype))
        for name in trainable.norms:
            _detach(model.get_submodule(name))
    return out


# --------------------------------------------------------------------------------------------
# Loss


def _kl_sum(student: Tensor, teacher: Tensor, head: nn.Module) -> Tensor:
    """Sum over tokens of KL(teacher || student) of the next-token distributions, from normed
    hidden states `(n, hidden)` (fp32 log-softmax)."""
    log_q = F.log_softmax(head(student).float(), dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(head(teacher).float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


def _micro_kl(model: nn.Module, adapter: ModelAdapter, inputs: Tensor, teacher: Tensor,
              ctx: dict) -> Tensor:
    """Mean KL per token of one micro-batch: block-0 inputs and teacher states `(b, T, hidden)`
    already on the device."""
    h = inputs
    for block in adapter.blocks(model):
        h = adapter.block_forward(block, h, ctx)
    h = adapter.final_norm(model)(h).flatten(0, 1)  # (b*T, hidden)
    t = teacher.flatten(0, 1)
    head = adapter.lm_head(model)
    chunks = list(zip(h.split(_KL_CHUNK), t.split(_KL_CHUNK), strict=True))
    if len(chunks) == 1 or not torch.is_grad_enabled():
        total = sum(_kl_sum(hs, ts, head) for hs, ts in chunks)
    else:  # keep one chunk's logits alive at a time, recomputed in the backward
        total = sum(checkpoint(_kl_sum, hs, ts, head, use_reentrant=False) for hs, ts in chunks)
    return total / h.shape[0]


@torch.no_grad()
def _held_out_kl(model, adapter, inputs: Tensor, teacher: Tensor, ctx, micro: int,
                 device) -> float:
    total = 0.0
    for x, t in zip(inputs.split(micro), teacher.split(micro), strict=True):
        total += float(_micro_kl(model, adapter, x.to(device), t.to(device), ctx)) * len(x)
    return total / inputs.shape[0]


# --------------------------------------------------------------------------------------------
# The stage


def scale_finetune(model: nn.Module, adapter: ModelAdapter, records: dict[str, QuantizedWeight],
                   windows: dict[str, Tensor], teacher: Teacher, cfg: QuantizeConfig,
                   device: torch.device, progress: bool = False,
                   ) -> tuple[dict[str, QuantizedWeight], dict]:
    """Train the scales of `records` (and norms) of the quantized `model` end to end (module doc).

    windows: the run's token windows {train, val} `(N, T)`; teacher: `capture_teacher` on them
    before quantization. Returns the records with the kept scales (the model holds them as
    `scale * codes`) and a report entry.
    """
    t0 = time.perf_counter()
    e2e = cfg.e2e
    model.to(device)
    ctx = capture_block_context(model, adapter, cfg.seqlen, device)
    inputs = {s: capture_block_inputs(model, adapter, ids, device, e2e.micro_batch_size).cpu()
              for s, ids in stage_windows(windows, cfg).items()}
    trainable = _parametrize(model, adapter, records, e2e.norms, device)
    try:
        run = _train(model, adapter, trainable, inputs, teacher, ctx, cfg, device, progress)
    finally:
        out = _release(model, records, trainable)
    run.update({"trained_scales": len(trainable.scales), "trained_norms": len(trainable.norms),
                "frozen": trainable.frozen, "teacher_seconds": round(teacher.seconds, 3),
                "seconds": round(time.perf_counter() - t0 + teacher.seconds, 3)})
    log.info("e2e scale stage: held-out KL %.5f -> %.5f (%s), %.1f s", run["val_kl_before"],
             run["val_kl_after"], "kept" if run["best_epoch"] else "input kept", run["seconds"])
    return out, run


def _train(model, adapter, trainable: _Trainable, inputs: dict[str, Tensor], teacher: Teacher,
           ctx: dict, cfg: QuantizeConfig, device: torch.device, progress: bool) -> dict:
    """The optimisation loop; leaves the best multipliers in place; returns the report entry."""
    from tqdm.auto import tqdm

    e2e = cfg.e2e
    n = inputs["train"].shape[0]
    batch = min(e2e.batch_size, n)
    per_epoch = n // batch
    sched = Schedule(e2e.epochs * per_epoch, lr_final_frac=e2e.lr_final_frac)
    params = trainable.params()
    opt = Lion(params, lr=e2e.lr, betas=e2e.betas, weight_decay=0.0) if params else None
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, _ORDER_SEED))

    def held_out() -> float:  # every process computes it; rank 0's value is used (`gsq.dist`)
        return dist.from_rank0([_held_out_kl(model, adapter, inputs["val"], teacher.val, ctx,
                                             e2e.micro_batch_size, device)])[0]

    world = dist.world()

    before = best_val = held_out()
    best, best_epoch, history, step = trainable.snapshot(), 0, [], 0
    bar = tqdm(total=sched.total_steps if opt else 0, disable=not progress, leave=False,
               desc="e2e scales", unit="step")
    for epoch in range(1, (e2e.epochs if opt else 0) + 1):
        t_epoch, order, losses = time.perf_counter(), torch.randperm(n, generator=gen), []
        for b in range(per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = e2e.lr * sched.lr_factor(step)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            # micro-batch m of the step runs on process m mod N; gradients summed over processes
            for m, micro in enumerate(idx.split(e2e.micro_batch_size)):
                if not world.owns(m):
                    continue
                loss = _micro_kl(model, adapter, inputs["train"][micro].to(device),
                                 teacher.train[micro].to(device), ctx) * (len(micro) / len(idx))
                loss.backward()
                total += float(loss.detach())
            if world.size > 1:
                summed = torch.tensor(total, dtype=torch.float64, device=device)
                dist.sum_gradients(params, summed)
                total = float(summed)
            if not math.isfinite(total):
                raise GSQError(f"e2e scale stage: non-finite training loss at step {step}")
            opt.step()
            losses.append(total)
            step += 1
            bar.update(1)
        val = held_out()
        history.append({"epoch": epoch, "train_kl": sum(losses) / max(len(losses), 1),
                        "val_kl": val, "seconds": round(time.perf_counter() - t_epoch, 3)})
        if val < best_val:  # NaN never wins
            best, best_val, best_epoch = trainable.snapshot(), val, epoch
    bar.close()
    trainable.restore(best)
    return {"epochs": e2e.epochs, "windows": n, "steps": step, "lr": e2e.lr, "batch_size": batch,
            "norms": e2e.norms, "val_kl_before": before, "val_kl_after": best_val,
            "best_epoch": best_epoch, "history": history}
