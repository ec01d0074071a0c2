"""End-to-end scale stage (method §12): after the block loop, the group scales (and optionally the
RMSNorm weights) of the whole quantized model are trained, codes frozen, on
KL(full precision || quantized) of the next-token distribution over the training windows.

Teacher. The full-precision model runs once (`capture_teacher`), block by block over the train
and val windows: before the block loop for a model quantized in memory (`gsq.api.quantize_model`),
or after a streamed run from the source checkpoint, one block read at a time
(`gsq.api.finetune_output`). It keeps the final hidden state after the final norm,
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
chunks (`_KL_CHUNK`, checkpointed when there are several). Two students share the optimisation
loop (`_train`) through one interface (`accumulate` the gradients of a step's micro-batches,
`held_out` KL): `_InMemory` here keeps the whole quantized model on the device and lets autograd
hold the activations; `gsq.calib.scale_stream` streams it one block at a time, block inputs kept
at block boundaries and the backward replayed block by block. Both give the same bits.

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

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from lion_pytorch import Lion
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from gsq import dist
from gsq.calib.cache import ActivationStore
from gsq.calib.capture import capture_block_context, capture_block_inputs
from gsq.calib.objectives import map_batches
from gsq.calib.sequential import BlockLoader
from gsq.config import QuantizeConfig
from gsq.errors import GSQError
from gsq.models.base import ModelAdapter
from gsq.quant.grids import to_bf16_grid
from gsq.quant.lattice import Fp16Lattice, project_ste
from gsq.quant.noise import derive_seed
from gsq.quant.schedule import Schedule
from gsq.quant.target import target_type
from gsq.quant.types import QuantizedWeight, QuantSpec

log = logging.getLogger(__name__)

_KL_CHUNK = 2048  # tokens per LM-head + KL chunk: 2048 x 49152 fp32 logits = 400 MB
_ORDER_SEED = 0xE2E
CPU = torch.device("cpu")


@dataclass
class Teacher:
    """The full-precision model's final hidden states after the final norm, `(N, T, hidden)`, on
    the train and val windows (host memory)."""

    train: Tensor
    val: Tensor
    seconds: float


@torch.no_grad()
def capture_teacher(model: nn.Module, adapter: ModelAdapter, windows: dict[str, Tensor],
                    cfg: QuantizeConfig, device: torch.device, loader: BlockLoader | None = None,
                    store: ActivationStore | None = None) -> Teacher:
    """Run the (still full-precision) model over the train and val windows `(N, T)`, one block on
    the device at a time, and keep its normed final hidden states on the host.

    loader: where the weights come from (default: the model in memory; a `StreamedBlocks` reads
    each block from the source checkpoint); store: the host tensors (RAM or spill files)."""
    t0 = time.perf_counter()
    micro = cfg.e2e.micro_batch_size
    loader = loader or BlockLoader()
    loader.load_embeddings(model, adapter, device)
    ctx = capture_block_context(model, adapter, cfg.seqlen, device)
    hidden = {s: capture_block_inputs(model, adapter, ids, device, micro, CPU, store)
              for s, ids in stage_windows(windows, cfg).items()}
    loader.release_embeddings(model, adapter)
    for index, block in enumerate(adapter.blocks(model)):
        loader.load(index, block, device)
        for s, h in hidden.items():
            hidden[s] = map_batches(lambda x, b=block: adapter.block_forward(b, x, ctx), h,
                                    micro, device, store)
        loader.release(index, block)
    norm = adapter.final_norm(model)
    loader.load_module(model, norm, device)
    hidden = {s: map_batches(norm, h, micro, device, store) for s, h in hidden.items()}
    loader.release_module(model, norm)
    return Teacher(hidden["train"], hidden["val"], time.perf_counter() - t0)


def stage_windows(windows: dict[str, Tensor], cfg: QuantizeConfig) -> dict[str, Tensor]:
    """The stage's train windows (the first `cfg.e2e.windows` of the train split) and val."""
    return {"train": windows["train"][: cfg.e2e.windows], "val": windows["val"]}


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


def storage_for(spec: QuantSpec, lattice=None):
    """What scales of `spec` are rounded to when stored (an object with `project`), or None if
    it cannot be known here (a K-type target without its `lattice`)."""
    if spec.target is None:
        return _Bf16
    if lattice is not None:
        return lattice
    return None if target_type(spec.target).is_k else Fp16Lattice(spec)


def scale_storage(qw: QuantizedWeight):
    """`storage_for` a record (its spec and the lattice it carries)."""
    return storage_for(qw.spec, qw.lattice)


def kept_scale(qw: QuantizedWeight, m: Tensor) -> Tensor:
    """The stored scale `project(s0 * m)` of a record trained to multipliers `m`."""
    with torch.no_grad():
        return _ScaledCodes(qw, scale_storage(qw)).scale(m.to(qw.scale.device)).detach().clone()


def split_trainable(model: nn.Module, adapter: ModelAdapter,
                    specs: dict[str, tuple[QuantSpec, object]]) -> tuple[list[str], list[str]]:
    """(trained, frozen) names of the records `{name: (spec, lattice)}`: MoE experts (slices of
    fused parameters) and K-type records without their lattice keep their scales."""
    experts = set(adapter.expert_linears(model))
    trained, frozen = [], []
    for name, (spec, lattice) in specs.items():
        keep = name in experts or storage_for(spec, lattice) is None
        (frozen if keep else trained).append(name)
    return trained, frozen


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


def attach_multipliers(model: nn.Module, records: dict[str, QuantizedWeight],
                       scale_names: Sequence[str], norm_names: Sequence[str],
                       device: torch.device) -> _Trainable:
    """Parametrise the linears `scale_names` (their `records`) and the norms `norm_names` of
    `model` (modules on `device`); every multiplier starts at 1."""
    scales = {}
    for name in scale_names:
        qw, storage = records[name], scale_storage(records[name])
        if hasattr(storage, "to"):
            storage = storage.to(device)
        scales[name] = _attach(model.get_submodule(name), _ScaledCodes(qw.to(device), storage))
    norms = {name: _attach(module := model.get_submodule(name), _ScaledNorm(module.weight))
             for name in norm_names}
    return _Trainable(scales, norms, [])


def detach_multipliers(model: nn.Module, trainable: _Trainable) -> None:
    """Remove the parametrisations: each weight keeps its parametrised value."""
    for name in [*trainable.scales, *trainable.norms]:
        _detach(model.get_submodule(name))


def _parametrize(model: nn.Module, adapter: ModelAdapter, records: dict[str, QuantizedWeight],
                 norms: bool, device: torch.device) -> _Trainable:
    trained, frozen = split_trainable(model, adapter,
                                      {n: (qw.spec, qw.lattice) for n, qw in records.items()})
    norm_names = list(adapter.norm_modules(model)) if norms else []
    trainable = attach_multipliers(model, records, trained, norm_names, device)
    trainable.frozen = frozen
    return trainable


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


def top_kl(norm: nn.Module, head: nn.Module, h: Tensor, teacher: Tensor) -> Tensor:
    """Mean KL per token of one micro-batch from the last block's output `h` and the teacher's
    normed states, both `(b, T, hidden)` on the device: final norm, then LM head + KL by chunks."""
    h = norm(h).flatten(0, 1)  # (b*T, hidden)
    t = teacher.flatten(0, 1)
    chunks = list(zip(h.split(_KL_CHUNK), t.split(_KL_CHUNK), strict=True))
    if len(chunks) == 1 or not torch.is_grad_enabled():
        total = sum(_kl_sum(hs, ts, head) for hs, ts in chunks)
    else:  # keep one chunk's logits alive at a time, recomputed in the backward
        total = sum(checkpoint(_kl_sum, hs, ts, head, use_reentrant=False) for hs, ts in chunks)
    return total / h.shape[0]


def _micro_kl(model: nn.Module, adapter: ModelAdapter, inputs: Tensor, teacher: Tensor,
              ctx: dict) -> Tensor:
    """Mean KL per token of one micro-batch: block-0 inputs and teacher states `(b, T, hidden)`
    already on the device."""
    h = inputs
    for block in adapter.blocks(model):
        h = adapter.block_forward(block, h, ctx)
    return top_kl(adapter.final_norm(model), adapter.lm_head(model), h, teacher)


# --------------------------------------------------------------------------------------------
# Students: what the optimisation loop needs of the quantized model


class Student(Protocol):
    """The quantized model under training, as the loop (`_train`) sees it."""

    trainable: _Trainable
    n_train: int  # train windows

    def accumulate(self, micros: list[Tensor], batch: int) -> float:
        """Backpropagate the KL of each micro-batch (window indices), weighted by its share
        len(micro) / batch of the step, into the multipliers' `.grad` (summed in the order of
        `micros`); returns the sum of the weighted losses."""

    def held_out(self) -> float:
        """Mean KL per token over the val windows with the current multipliers."""


@dataclass
class _InMemory:
    """The whole quantized model on the device, autograd through all of it per micro-batch."""

    model: nn.Module
    adapter: ModelAdapter
    trainable: _Trainable
    inputs: dict[str, Tensor]  # block-0 inputs {train, val} `(N, T, hidden)`, host
    teacher: Teacher
    ctx: dict
    micro: int
    device: torch.device

    @property
    def n_train(self) -> int:
        return self.inputs["train"].shape[0]

    def accumulate(self, micros: list[Tensor], batch: int) -> float:
        total = 0.0
        for micro in micros:
            loss = _micro_kl(self.model, self.adapter, self.inputs["train"][micro].to(self.device),
                             self.teacher.train[micro].to(self.device), self.ctx)
            loss = loss * (len(micro) / batch)
            loss.backward()
            total += float(loss.detach())
        return total

    @torch.no_grad()
    def held_out(self) -> float:
        total = 0.0
        for x, t in zip(self.inputs["val"].split(self.micro), self.teacher.val.split(self.micro),
                        strict=True):
            total += float(_micro_kl(self.model, self.adapter, x.to(self.device),
                                     t.to(self.device), self.ctx)) * len(x)
        return total / self.inputs["val"].shape[0]


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
    student = _InMemory(model, adapter, trainable, inputs, teacher, ctx, e2e.micro_batch_size,
                        device)
    try:
        run = train(student, cfg, device, progress)
    finally:
        out = _release(model, records, trainable)
    return out, stage_report(run, trainable, teacher, t0)


def stage_report(run: dict, trainable: _Trainable, teacher: Teacher, t0: float) -> dict:
    """The report entry of a finished stage (`train`'s entry completed), logged."""
    run.update({"trained_scales": len(trainable.scales), "trained_norms": len(trainable.norms),
                "frozen": trainable.frozen, "teacher_seconds": round(teacher.seconds, 3),
                "seconds": round(time.perf_counter() - t0 + teacher.seconds, 3)})
    log.info("e2e scale stage: held-out KL %.5f -> %.5f (%s), %.1f s", run["val_kl_before"],
             run["val_kl_after"], "kept" if run["best_epoch"] else "input kept", run["seconds"])
    return run


def train(student: Student, cfg: QuantizeConfig, device: torch.device, progress: bool) -> dict:
    """The optimisation loop; leaves the best multipliers in `student.trainable`; returns the
    report entry. Lion is elementwise, so one optimiser over every multiplier takes the same
    steps as one per block would."""
    from tqdm.auto import tqdm

    e2e, trainable = cfg.e2e, student.trainable
    n = student.n_train
    batch = min(e2e.batch_size, n)
    per_epoch = n // batch
    sched = Schedule(e2e.epochs * per_epoch, lr_final_frac=e2e.lr_final_frac)
    params = trainable.params()
    opt = Lion(params, lr=e2e.lr, betas=e2e.betas, weight_decay=0.0) if params else None
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, _ORDER_SEED))

    def held_out() -> float:  # every process computes it; rank 0's value is used (`gsq.dist`)
        return dist.from_rank0([student.held_out()])[0]

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
            # micro-batch m of the step runs on process m mod N; gradients summed over processes
            micros = [mb for m, mb in enumerate(idx.split(e2e.micro_batch_size)) if world.owns(m)]
            total = student.accumulate(micros, len(idx)) if micros else 0.0
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
