"""The end-to-end scale stage streamed one block at a time, for a model whose quantized weights
do not fit in memory (the stage itself, its parametrisation, loss, loop and acceptance are
`gsq.calib.scale_finetune`'s; this is another `Student` for its loop).

State on the host, for every block: the multipliers `m` (one value per group, and per norm
weight), their gradients, Lion's moment and the best snapshot; 4 fp32 values per group in all.

A step (`StreamedStudent.accumulate`), for the step's micro-batches (window indices):
  1. forward, block-major, without autograd: each block is loaded (`BlockLoader`: its tensors
     read, its linears `scale * codes`), parametrised with the current multipliers
     (`project(s0 * m) * codes`, exactly the in-memory forward), and runs every micro-batch;
     the input of every block is kept, `(b, T, hidden)` per micro-batch, on the host (RAM or
     spill files of an `ActivationStore`);
  2. top: final norm + LM head + KL per micro-batch (`top_kl`) from the last block's output,
     backpropagated to that output (and to the final norm's multiplier);
  3. backward, blocks in reverse: each block is loaded again, its forward recomputed with
     autograd from the kept input, and the incoming gradient backpropagated through it: its
     multipliers accumulate their gradients (micro-batches in order) and the gradient at its
     input goes on to the block before. The gradients go to the host multipliers.
The loop then takes one Lion step on the host multipliers. Lion is elementwise, so this is the
step per-block optimisers would take, and the step the in-memory stage takes.

Same bits as in memory. Each block runs the same micro-batches (same shapes, same kernels) on
the same values; a block's backward is the in-memory backward's part for that block (the
gradient at its output enters as the upstream gradient), and each multiplier sums its
micro-batches' gradients in the same order. On the CPU in fp32 the kept scales are those of
`scale_finetune` bit for bit (tests/calib/test_scale_stream.py).

Held-out KL: the val windows block-major through the blocks (forward only, one `(N, T, hidden)`
tensor of hidden states at a time), then the top per micro-batch.

Only one block's weights are resident at a time (the final norm and the LM head during the
top). Each step reads every block twice and each held-out pass once more.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from gsq.calib.cache import ActivationStore
from gsq.calib.capture import capture_block_context, capture_block_inputs
from gsq.calib.objectives import map_batches
from gsq.calib.scale_finetune import (
    CPU,
    Teacher,
    _Trainable,
    attach_multipliers,
    detach_multipliers,
    split_trainable,
    stage_report,
    stage_windows,
    top_kl,
    train,
)
from gsq.calib.sequential import BlockLoader
from gsq.config import QuantizeConfig
from gsq.models.base import ModelAdapter
from gsq.quant.types import QuantizedWeight, QuantSpec


class StreamedStudent:
    """The quantized model streamed block by block, as the stage's loop sees it (`Student`).

    loader: loads block i into `model` on the device with its linears `scale * codes` and its
    records in `loader.records` (`gsq.models.quantized_stream.QuantizedBlocks`); trainable: the host
    multipliers; inputs: block-0 inputs {train, val} `(N, T, hidden)`; store: host tensors."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, loader: BlockLoader,
                 trainable: _Trainable, inputs: dict[str, Tensor], teacher: Teacher, ctx: dict,
                 micro: int, device: torch.device, store: ActivationStore | None = None) -> None:
        self.model, self.adapter, self.loader = model, adapter, loader
        self.trainable, self.inputs, self.teacher = trainable, inputs, teacher
        self.ctx, self.micro, self.device, self.store = ctx, micro, device, store
        self.blocks = adapter.blocks(model)
        self.prefixes = [adapter.first_block_prefix().format(i=i) for i in range(len(self.blocks))]
        self.n_train = inputs["train"].shape[0]

    # -- a step ---------------------------------------------------------------------------

    def accumulate(self, micros: list[Tensor], batch: int) -> float:
        kept = self._forward(micros)  # block inputs, then the last block's output
        grads, total = self._top_backward(kept.pop(), micros, batch)
        for index in reversed(range(len(self.blocks))):
            grads = self._block_backward(index, kept.pop(), grads)
        return total

    @torch.no_grad()
    def _forward(self, micros: list[Tensor]) -> list[list[Tensor]]:
        """[inputs of block 0, ..., inputs of block L-1, output of block L-1], each a list of
        `(b, T, hidden)` host tensors, one per micro-batch."""
        h = [self._keep(self.inputs["train"][mb]) for mb in micros]
        kept = [h]
        for index in range(len(self.blocks)):
            with self._block(index) as block:
                h = [self._keep(self.adapter.block_forward(block, x.to(self.device), self.ctx))
                     for x in h]
            kept.append(h)
        return kept

    def _top_backward(self, outputs: list[Tensor], micros: list[Tensor],
                      batch: int) -> tuple[list[Tensor], float]:
        """Each micro-batch's KL, weighted by its share of the step, backpropagated to the last
        block's output: (its gradients `(b, T, hidden)` on the device, the summed losses)."""
        grads, total = [], 0.0
        with self._top() as (norm, head):
            for h, mb in zip(outputs, micros, strict=True):
                x = h.to(self.device).detach().requires_grad_(True)
                loss = top_kl(norm, head, x, self.teacher.train[mb].to(self.device))
                loss = loss * (len(mb) / batch)
                loss.backward()
                total += float(loss.detach())
                grads.append(x.grad)
        return grads, total

    def _block_backward(self, index: int, inputs: list[Tensor],
                        grads: list[Tensor]) -> list[Tensor]:
        """Recompute block `index` on its kept inputs with autograd and backpropagate `grads`
        (at its output) through it; returns the gradients at its inputs (None for block 0,
        whose inputs, the embeddings, are not trained)."""
        out = []
        with self._block(index) as block:
            for h, g in zip(inputs, grads, strict=True):
                x = h.to(self.device).detach().requires_grad_(index > 0)
                torch.autograd.backward(self.adapter.block_forward(block, x, self.ctx), g)
                out.append(x.grad)
        return out

    # -- held-out KL ----------------------------------------------------------------------

    @torch.no_grad()
    def held_out(self) -> float:
        h = self.inputs["val"]
        for index in range(len(self.blocks)):
            with self._block(index) as block:
                h = map_batches(lambda x, b=block: self.adapter.block_forward(b, x, self.ctx),
                                h, self.micro, self.device, self.store)
        total = 0.0
        with self._top() as (norm, head):
            for x, t in zip(h.split(self.micro), self.teacher.val.split(self.micro),
                            strict=True):
                total += float(top_kl(norm, head, x.to(self.device), t.to(self.device))) * len(x)
        return total / h.shape[0]

    # -- weights --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _block(self, index: int) -> Iterator[nn.Module]:
        """Block `index` on the device with the current multipliers attached; their gradients,
        if any, go to the host multipliers when it is released."""
        block, prefix = self.blocks[index], self.prefixes[index]
        self.loader.load(index, block, self.device)
        part = self._attach(lambda name: name.startswith(prefix), self.loader.records)
        try:
            yield block
        finally:
            self._release(part)
            self.loader.release(index, block)

    @contextlib.contextmanager
    def _top(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """The final norm (its multiplier attached) and the LM head on the device."""
        norm, head = self.adapter.final_norm(self.model), self.adapter.lm_head(self.model)
        self.loader.load_module(self.model, norm, self.device)
        self.loader.load_module(self.model, head, self.device)
        part = self._attach(lambda name: not any(name.startswith(p) for p in self.prefixes), {})
        try:
            yield norm, head
        finally:
            self._release(part)
            self.loader.release_module(self.model, head)
            self.loader.release_module(self.model, norm)

    def _attach(self, select: Callable[[str], bool],
                records: dict[str, QuantizedWeight]) -> _Trainable:
        """Parametrise the selected linears and norms with device copies of the multipliers."""
        host = self.trainable
        part = attach_multipliers(self.model, records, [n for n in host.scales if select(n)],
                                  [n for n in host.norms if select(n)], self.device)
        values = _named_host(host)
        with torch.no_grad():
            for name, m in _named(part):
                m.copy_(values[name])
        return part

    def _release(self, part: _Trainable) -> None:
        host = _named_host(self.trainable)
        for name, m in _named(part):
            if m.grad is not None:
                host[name].grad = m.grad.to(CPU)
        detach_multipliers(self.model, part)

    def _keep(self, x: Tensor) -> Tensor:
        """`x` on the host: in RAM, or in a spill file of the store."""
        if self.store is None:
            return x.to(CPU)
        out = self.store.like(x)
        out.copy_(x)
        return out


def _named(trainable: _Trainable) -> list[tuple[str, nn.Parameter]]:
    return [*trainable.scales.items(), *trainable.norms.items()]


def _named_host(trainable: _Trainable) -> dict[str, nn.Parameter]:
    return dict(_named(trainable))


def host_multipliers(model: nn.Module, adapter: ModelAdapter, specs: dict[str, QuantSpec],
                     scale_shapes: dict[str, tuple[int, ...]], norms: bool) -> _Trainable:
    """The multipliers of every trainable record (`split_trainable`; records read from disk
    carry no K-type lattice) and, with `norms`, of every RMSNorm: ones, fp32, on the host."""
    trained, frozen = split_trainable(model, adapter, {n: (s, None) for n, s in specs.items()})
    scales = {n: nn.Parameter(torch.ones(scale_shapes[n])) for n in trained}
    norm_params = {n: nn.Parameter(torch.ones(m.weight.shape))
                   for n, m in adapter.norm_modules(model).items()} if norms else {}
    return _Trainable(scales, norm_params, frozen)


def scale_finetune_streamed(model: nn.Module, adapter: ModelAdapter, loader: BlockLoader,
                            trainable: _Trainable, windows: dict[str, Tensor], teacher: Teacher,
                            cfg: QuantizeConfig, device: torch.device, progress: bool = False,
                            store: ActivationStore | None = None) -> dict:
    """Train the host multipliers `trainable` (`host_multipliers`) of the quantized model that
    `loader` streams into the skeleton `model`, end to end (`scale_finetune`'s stage, module
    doc). Leaves the kept multipliers in `trainable`; returns the report entry."""
    t0 = time.perf_counter()
    micro = cfg.e2e.micro_batch_size
    loader.load_embeddings(model, adapter, device)
    ctx = capture_block_context(model, adapter, cfg.seqlen, device)
    inputs = {s: capture_block_inputs(model, adapter, ids, device, micro, CPU, store)
              for s, ids in stage_windows(windows, cfg).items()}
    loader.release_embeddings(model, adapter)
    student = StreamedStudent(model, adapter, loader, trainable, inputs, teacher, ctx, micro,
                              device, store)
    run = train(student, cfg, device, progress)
    return stage_report(run, trainable, teacher, t0)
