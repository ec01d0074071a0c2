"""The block loop (method §3.1, §11): quantize a decoder-only model one block at a time.

For each block, with inputs from the already-quantized prefix:
  1. cache the full-precision targets (attention output and block output) on train and val inputs;
  2. for each stage of the adapter (qk -> vo -> mlp, or mlp only): collect the stage's Hessians with
     earlier stages hard and its own weights FP, initialise with GPTQ (or RTN), then for GSQ train
     the stage's quantizers on its objective and hard-round; write the hard weights into the block;
  3. push the train, val and GPTQ buffers through the hard block to feed the next one.
Only the current block and its training state live on the device; the model skeleton stays put.

Under several processes (`gsq.dist`) the activations pushed through a block (FP targets, the MLP
stage's inputs, the next block's inputs; block-0 inputs in `prepare_run`) are computed batch by
batch, batch c by rank c mod N, and shared (`map_batches(shard=True)`): through the node's
shared activation store when the buffers are on the host and there is one, else sent between
ranks. Every rank then holds the same rows as one process would.

MoE blocks (`adapter.experts(block)` non-empty): the MLP stage holds every expert's gate/up/down
linears, each with its own GPTQ Hessian on the tokens the full-precision router sends to its
expert (`adapter.hessian_collector`); same-shape experts are solved in one batched GPTQ. GSQ
trains all experts together on the block-output objective, their soft weights stacked into the
fused expert parameters (`adapter.trial_params`). An expert routed fewer than
`cfg.moe_min_tokens` tokens takes a fallback (see `Routing`), reported per expert.
Under several processes GPTQ of the experts is expert parallel (`gsq.dist`): expert e's Hessian
sums go to rank e mod N alone, which solves it; every rank then receives every expert's codes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gsq import dist
from gsq.calib.cache import ActivationStore
from gsq.calib.capture import capture_block_context, capture_block_inputs
from gsq.calib.objectives import ActivationObjective, map_batches
from gsq.config import QuantizeConfig
from gsq.errors import GSQError
from gsq.models.base import ModelAdapter, StageSpec
from gsq.quant.gptq import gptq_quantize, gptq_quantize_batched
from gsq.quant.hessian import reduce_accumulators
from gsq.quant.layerwise import QuadraticObjective
from gsq.quant.noise import derive_seed
from gsq.quant.quantizers import make_quantizer
from gsq.quant.rtn import rtn_quantize
from gsq.quant.trainer import TrainResult, train_quantizers
from gsq.quant.types import QuantizedWeight, QuantSpec

log = logging.getLogger(__name__)

_STAGE_IDS = {"qk": 1, "vo": 2, "mlp": 3}
QK_EVALS = 10  # held-out checks (best-step candidates) over a Q/K stage


@dataclass
class Buffers:
    """Hidden states entering the current block, `(N, T, hidden)` per split; `store` allocates
    the host tensors derived from them (RAM or spill files, `gsq.calib.cache`); `propagated`:
    rows (windows) this process pushed through the previous block to make them."""

    train: Tensor
    val: Tensor
    gptq: Tensor
    store: ActivationStore | None = field(default=None, compare=False, repr=False)
    propagated: int = field(default=0, compare=False)

    def items(self):
        return {"train": self.train, "val": self.val, "gptq": self.gptq}.items()


@dataclass
class BlockContext:
    block: nn.Module
    index: int
    prefix: str  # full-name prefix of the block's modules, e.g. "model.layers.3."
    ctx: dict[str, Any]  # block call kwargs (rotary embeddings, mask)
    W_f: dict[str, Tensor]  # original weights of the in-scope linears
    targets: dict[str, Tensor] = field(default_factory=dict)  # FP outputs: attn_/block_ train/val
    # Optional initialiser replacing GPTQ/RTN (e.g. a GGUF file's codes, `gsq refine`), see
    # `InitProvider`; None = the configured GPTQ/RTN init.
    init_provider: InitProvider | None = None

    @property
    def device(self) -> torch.device:
        """Where the block (and its training state) lives; buffers may live on the host."""
        return next(self.block.parameters()).device


# (block context, stage, names of the stage's linears) -> initial records by name. A record may
# carry `make_quantizer(init_cfg, generator)` (e.g. `AffineWeight`). Linears left out are not
# trained: the provider writes whatever weight they must have into `bc.block` itself.
InitProvider = Callable[["BlockContext", StageSpec, list[str]], dict[str, Any]]
# What quantizing one block returns: records by full module name, report entry, next buffers.
BlockResult = tuple[dict[str, Any], dict, "Buffers"]
# (block index, block, block call kwargs, its input buffers, quantize) -> the block's result.
# Wraps the quantization of each block: `quantize()` runs it; the hook may look at the block
# before and after, and return another result, e.g. revert the block to its initial assignment
# when it did not get better on held-out inputs (`gsq refine`).
BlockHook = Callable[[int, nn.Module, dict, "Buffers", Callable[[], BlockResult]], BlockResult]


def stage_specs(cfg: QuantizeConfig, stage: StageSpec, prefix: str, block: nn.Module,
                adapter: ModelAdapter | None = None) -> dict[str, QuantSpec]:
    """The linears of `stage` to quantize in this block, with their specs (skips removed)."""
    specs = {}
    for name in stage.linears:
        weight = adapter.weight(block, name) if adapter else block.get_submodule(name).weight
        width = weight.shape[1]
        spec = cfg.spec_for(prefix + name, width)  # a GGUF target may fall back on odd widths
        if spec is None:
            continue
        if width % spec.group_size != 0:
            raise GSQError(f"group size {spec.group_size} does not divide the input width {width} "
                           f"of {prefix + name}")
        specs[name] = spec
    return specs


def active_stages(adapter: ModelAdapter, cfg: QuantizeConfig,
                  block: nn.Module | None = None) -> list[StageSpec]:
    """The stages the run quantizes (of `block`, whose layout may differ between blocks)."""
    stages = adapter.stages if block is None else adapter.block_stages(block)
    return [s for s in stages if cfg.scope == "all" or s.objective == "block"]


@torch.no_grad()
def _hessians(bc: BlockContext, adapter: ModelAdapter, names: list[str], x: Tensor,
              micro: int, pooled: frozenset[str] = frozenset(),
              owners: dict[str, int] | None = None) -> dict[str, Tensor]:
    """H of each named linear's inputs while `x` runs through the block in its current state
    (`pooled`: routed linears that see every token of their layer, `hessian_collector`).
    Under several processes each runs its share of the chunks and the sums are added up
    (`gsq.dist`), so every process gets the same H; a linear in `owners` (an MoE expert's,
    name -> rank) has its sums added up on its owner alone, and only there is its H returned."""
    world, owners = dist.world(), owners or {}
    with adapter.hessian_collector(bc.block, names, pooled) as accs:
        for c, chunk in enumerate(x.split(micro)):
            if world.owns(c):
                adapter.block_forward(bc.block, chunk.to(bc.device), bc.ctx)
    if world.size > 1:
        reduce_accumulators(accs, owners, dist.all_reduce_sum, dist.reduce_sum)
    return {name: acc.H for name, acc in accs.items() if owners.get(name, world.rank) == world.rank}


@torch.no_grad()
def _set_weights(adapter: ModelAdapter, block: nn.Module,
                 results: dict[str, QuantizedWeight]) -> None:
    for name, qw in results.items():
        weight = adapter.weight(block, name)
        weight.copy_(qw.dequantize(weight.dtype).to(weight.device))


@dataclass
class Routing:
    """Calibration tokens per routed expert of an MoE stage, the experts that fall back, and the
    rank that solves each expert's GPTQ (`owners`: expert e -> rank e mod N, `gsq.dist`).

    `tokens[split][key]`: tokens the full-precision router sent to expert `key` (each token
    counts once per expert of its top-k), for the "gptq" split (counted for every method) and
    the "train" split (GSQ). Fallbacks, for experts routed fewer than `min_tokens` tokens:
      * "pooled_hessian": GPTQ takes the expert's Hessians over every token entering its MoE
        layer (its gate/up see the layer's inputs, its down their image through its own
        quantized gate/up), instead of a rank-deficient Hessian of a few tokens;
      * "kept_init": GSQ does not train the expert (a few tokens would only overfit it); it
        keeps its GPTQ (or RTN) codes.
    """

    experts: dict[str, tuple[str, ...]]  # expert key -> its linears quantized in this stage
    min_tokens: int
    owners: dict[str, int] = field(default_factory=dict)  # expert key -> rank solving its GPTQ
    tokens: dict[str, dict[str, int]] = field(default_factory=dict)
    fallback: dict[str, list[str]] = field(default_factory=dict)  # expert key -> fallbacks
    solved: list[str] = field(default_factory=list)  # expert keys whose GPTQ this process solved

    def linear_owners(self) -> dict[str, int]:
        """The owner of each expert linear (its expert's)."""
        return {n: self.owners[k] for k, linears in self.experts.items() for n in linears}

    def mark_solved(self, names: Iterable[str]) -> None:
        """Record the experts with a linear among `names` (solved by this process)."""
        names = set(names)
        self.solved += [k for k, linears in self.experts.items()
                        if k not in self.solved and names & set(linears)]

    @torch.no_grad()
    def count(self, bc: BlockContext, adapter: ModelAdapter, split: str,
              mids: Iterable[Tensor]) -> None:
        """Count the tokens of batches of post-attention hidden states `(n, T, hidden)`."""
        total = sum(adapter.expert_token_counts(bc.block, chunk.to(bc.device)) for chunk in mids)
        self.tokens[split] = {key: int(n) for key, n in zip(adapter.experts(bc.block), total,
                                                             strict=True)}

    def starved(self, split: str, fallback: str) -> frozenset[str]:
        """Linears of the experts with too few `split` tokens; records `fallback` for them."""
        keys = [k for k in self.experts if self.tokens[split][k] < self.min_tokens]
        for key in keys:
            self.fallback.setdefault(key, []).append(fallback)
        return frozenset(n for k in keys for n in self.experts[k])

    def report(self, prefix: str) -> list[dict]:
        return [{"expert": prefix + key,
                 **{f"tokens_{split}": counts[key] for split, counts in self.tokens.items()},
                 "fallback": self.fallback.get(key, [])}
                for key in self.tokens["gptq"]]


def _routing(bc: BlockContext, adapter: ModelAdapter, cfg: QuantizeConfig, specs: dict,
             bufs: Buffers) -> Routing | None:
    """The stage's `Routing` with the GPTQ split counted (None: no routed expert in `specs`)."""
    experts = {k: tuple(n for n in linears if n in specs)
               for k, linears in adapter.experts(bc.block).items()}
    world = dist.world()
    owners = {k: world.owner(e) for e, k in enumerate(experts)}  # e: the expert's index
    experts = {k: v for k, v in experts.items() if v}
    if not experts:
        return None
    routing = Routing(experts, cfg.moe_min_tokens, {k: owners[k] for k in experts})
    micro = cfg.train.micro_batch_size
    routing.count(bc, adapter, "gptq", (adapter.attention_residual(bc.block, x.to(bc.device),
                                                                    bc.ctx)
                                        for x in bufs.gptq.split(micro)))
    return routing


def _gptq(bc: BlockContext, cfg: QuantizeConfig, group: list[str], specs: dict,
          H: dict[str, Tensor], batched: set[str]) -> dict[str, QuantizedWeight]:
    """GPTQ of a group's linears; those in `batched` (experts) with the same shape and spec
    are solved together (`gptq_quantize_batched`, same arithmetic), unless act-order or a GGUF
    target asks for the per-weight solver."""
    def solo(n):
        return gptq_quantize(bc.W_f[n], H[n], specs[n], cfg.percdamp, cfg.gptq_block_size,
                             cfg.static_groups, cfg.act_order)

    done, batches = {}, {}
    for n in group:
        if n in batched and not cfg.act_order and specs[n].target is None:
            batches.setdefault((tuple(bc.W_f[n].shape), specs[n]), []).append(n)
        else:
            done[n] = solo(n)
    for (_, spec), names in batches.items():
        W = torch.stack([bc.W_f[n] for n in names])
        Hs = torch.stack([H[n].to(W.device) for n in names])
        out = gptq_quantize_batched(W, Hs, spec, cfg.percdamp, cfg.gptq_block_size,
                                    cfg.static_groups)
        done.update(zip(names, out, strict=True))
    return {n: done[n] for n in group}


def _from_owners(done: dict[str, QuantizedWeight], group: list[str], owners: dict[str, int],
                 device: torch.device) -> dict[str, QuantizedWeight]:
    """The records of all of `group`, in its order, on every rank: those solved here (`done`)
    and those of linears in `owners` solved by their owner, sent from each owner in turn (on the
    CPU, put on `device`). One process: `done` itself."""
    world = dist.world()
    if world.size == 1 or not owners:
        return done
    got = dict(done)
    for rank in range(world.size):
        mine = {n: qw.to("cpu") for n, qw in done.items() if owners.get(n) == rank}
        theirs = dist.broadcast_object(mine, rank)  # rank's own records, on every rank
        if rank != world.rank:
            got.update({n: qw.to(device) for n, qw in theirs.items()})
    return {n: got[n] for n in group}


def _initial_assignment(bc, adapter, cfg, stage, specs, bufs, micro,
                        routing: Routing | None = None) -> tuple[dict, dict]:
    """GPTQ (or RTN) codes of each linear, and the GPTQ Hessians (empty for RTN).

    GPTQ runs group by group in the stage's `gptq_order`, each group written into the block
    before the next group's Hessians are collected, so e.g. down_proj is fitted to the outputs of
    the quantized gate/up projections (the usual "true sequential" GPTQ).
    With `bc.init_provider`, its records instead (no Hessians).
    With `routing` (MoE), starved experts get pooled Hessians (`Routing`), and each expert is
    solved by its owner alone, which sends its codes to every rank (`gsq.dist`); the Hessians
    returned are then those of the linears this rank solved.
    """
    if bc.init_provider is not None:
        return bc.init_provider(bc, stage, list(specs)), {}
    if cfg.method == "rtn" or (cfg.method == "gsq" and cfg.init == "rtn"):
        return {n: rtn_quantize(bc.W_f[n], s) for n, s in specs.items()}, {}
    pooled = routing.starved("gptq", "pooled_hessian") if routing else frozenset()
    batched = {n for linears in routing.experts.values() for n in linears} if routing else set()
    owners = routing.linear_owners() if routing else {}
    init, H = {}, {}
    for group in stage.gptq_groups(list(specs)):
        H.update(_hessians(bc, adapter, group, bufs.gptq, micro, pooled & set(group), owners))
        mine = [n for n in group if n in H]  # under expert parallelism, the owned experts'
        done = _gptq(bc, cfg, mine, specs, H, batched)
        if routing is not None:
            routing.mark_solved(mine)
        done = _from_owners(done, group, owners, bc.device)
        _set_weights(adapter, bc.block, done)
        init.update(done)
    return init, H


def _quantizers(init: dict[str, QuantizedWeight], cfg: QuantizeConfig, seed: int) -> dict:
    out = {}
    for qi, (name, qw) in enumerate(init.items()):
        gen = torch.Generator().manual_seed(derive_seed(seed, qi, 0x1417))
        factory = getattr(qw, "make_quantizer", None)  # records that bring their own quantizer
        out[name] = factory(cfg.init_cfg, gen) if factory else make_quantizer(qw, cfg.init_cfg, gen)
    return out


def _train_quadratic(bc, adapter, cfg, init, H, bufs, seed, progress) -> tuple[dict, list]:
    """Q/K stage: each linear alone on tr(ΔW H ΔWᵀ), validated on the val buffer's Hessian."""
    H_val = _hessians(bc, adapter, list(init), bufs.val, cfg.train.micro_batch_size)
    # Every step is full-batch; the held-out loss is checked `evals` times over the run, where
    # evals <= QK_EVALS divides qk_steps so that exactly qk_steps steps run.
    evals = max((d for d in range(1, QK_EVALS + 1) if cfg.qk_steps % d == 0), default=1)
    # The stage's optimiser settings, with full-batch steps and a constant lr (method §7).
    qk_cfg = dataclasses.replace(cfg.train, epochs=evals if cfg.qk_steps else 0, batch_size=1,
                                 micro_batch_size=1, cosine=False)
    results, runs = {}, []
    for qi, (name, qw) in enumerate(init.items()):
        objective = QuadraticObjective(name, bc.W_f[name], H[name], H_val[name],
                                       steps_per_epoch=max(1, cfg.qk_steps // evals))

        quantizers = _quantizers({name: qw}, cfg, derive_seed(seed, qi))
        run = train_quantizers(quantizers, objective, qk_cfg, derive_seed(seed, qi), progress,
                               desc=f"block {bc.index} {name}")
        results.update(run.results)
        runs.append(run)
    return results, runs


def _train_activation(bc, adapter, cfg, stage, init, bufs, seed, progress,
                      routing: Routing | None = None) -> tuple[dict, list]:
    """V/O stage on the attention output, or MLP stage on the block output (method §3.1).

    With `routing` (MoE), the train split's tokens per expert are counted and starved experts
    keep their initial codes (written into the block, left out of training)."""
    micro = cfg.train.micro_batch_size
    if stage.objective == "attention":
        def fn(block, x):
            return adapter.attention_residual(block, x, bc.ctx)
        train = (bufs.train, bc.targets["attn_train"])
        val = (bufs.val, bc.targets["attn_val"])
    else:  # "block": MLP inputs come through the block's (already hard) attention
        def attn(x):
            return adapter.attention_residual(bc.block, x, bc.ctx)

        def fn(block, x):
            return adapter.mlp_residual(block, x)
        train = (map_batches(attn, bufs.train, micro, bc.device, bufs.store, shard=True),
                 bc.targets["block_train"])
        val = (map_batches(attn, bufs.val, micro, bc.device, bufs.store, shard=True),
               bc.targets["block_val"])
    kept = {}
    if routing is not None:
        routing.count(bc, adapter, "train", train[0].split(micro))
        starved = routing.starved("train", "kept_init")
        kept = {n: qw for n, qw in init.items() if n in starved}
        init = {n: qw for n, qw in init.items() if n not in starved}
        _set_weights(adapter, bc.block, kept)
    if not init:
        return kept, []
    device = next(bc.block.parameters()).device
    objective = ActivationObjective(bc.block, fn, train, val, micro, device, cfg.train.autocast,
                                    params=lambda weights: adapter.trial_params(bc.block, weights))
    quantizers = _quantizers(init, cfg, seed)
    run = train_quantizers(quantizers, objective, cfg.train, seed, progress,
                           desc=f"block {bc.index} {stage.name}")
    return {**run.results, **kept}, [run]


def _run_summary(stage: StageSpec, names: list[str], runs: list[TrainResult],
                 seconds: float) -> dict:
    return {
        "stage": stage.name,
        "linears": names,
        "seconds": round(seconds, 3),
        "val_loss_init": [r.init_val for r in runs],
        "val_loss_final": [r.best_val for r in runs],
        "best_epoch": [r.best_epoch for r in runs],
        "kept_init": [r.best_epoch == 0 for r in runs],
        "steps": [r.steps for r in runs],
        "logit_lr": [r.logit_lr for r in runs],
        "history": [r.history for r in runs] if stage.objective != "quadratic" else [],
    }


def quantize_stage(bc: BlockContext, adapter: ModelAdapter, cfg: QuantizeConfig, stage: StageSpec,
                   bufs: Buffers, progress: bool) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize one stage's linears in place; returns their records and a report entry."""
    t0 = time.perf_counter()
    specs = stage_specs(cfg, stage, bc.prefix, bc.block, adapter)
    if not specs:
        return {}, {"stage": stage.name, "linears": [], "skipped": True}
    micro = cfg.train.micro_batch_size
    routing = _routing(bc, adapter, cfg, specs, bufs) if bc.init_provider is None else None
    init, H = _initial_assignment(bc, adapter, cfg, stage, specs, bufs, micro, routing)
    results, runs = init, []
    if cfg.method == "gsq" and stage.name in cfg.gsq_stages and init:
        seed = derive_seed(cfg.seed, bc.index, _STAGE_IDS.get(stage.name, 0))
        try:
            if stage.objective == "quadratic":
                if not H:  # RTN init: the quadratic loss still needs the stage's Hessians
                    H = _hessians(bc, adapter, list(specs), bufs.gptq, micro)
                results, runs = _train_quadratic(bc, adapter, cfg, init, H, bufs, seed, progress)
            else:
                results, runs = _train_activation(bc, adapter, cfg, stage, init, bufs, seed,
                                                  progress, routing)
        except FloatingPointError as err:
            raise GSQError(f"block {bc.index} stage {stage.name}: {err}") from err
    _set_weights(adapter, bc.block, results)
    summary = _run_summary(stage, list(specs), runs, time.perf_counter() - t0)
    if routing is not None:
        summary["experts"] = routing.report(bc.prefix)
        summary["experts_solved"] = [bc.prefix + k for k in routing.solved]  # by this process
    return results, summary


@torch.no_grad()
def _cache_fp_targets(bc: BlockContext, adapter: ModelAdapter, bufs: Buffers, micro: int,
                      need_train: bool) -> None:
    """Full-precision attention and block outputs on the val (and train) inputs."""
    def attn(x):
        return adapter.attention_residual(bc.block, x, bc.ctx)

    splits = {"val": bufs.val, "train": bufs.train} if need_train else {"val": bufs.val}
    for split, x in splits.items():
        attn_out = map_batches(attn, x, micro, bc.device, bufs.store, shard=True)
        bc.targets[f"attn_{split}"] = attn_out
        bc.targets[f"block_{split}"] = map_batches(lambda h: adapter.mlp_residual(bc.block, h),
                                                   attn_out, micro, bc.device, bufs.store,
                                                   shard=True)


@torch.no_grad()
def _propagate(bc: BlockContext, adapter: ModelAdapter, bufs: Buffers, micro: int) -> Buffers:
    """Push every buffer through the (hard) block: the next block's inputs, each process
    computing its share of the batches (`map_batches(shard=True)`), counted in `propagated`."""
    rows = 0

    def run(x):  # x: (b, T, hidden), one batch of this process's share
        nonlocal rows
        rows += len(x)
        return adapter.block_forward(bc.block, x, bc.ctx)

    nxt = [map_batches(run, x, micro, bc.device, bufs.store, shard=True) for _, x in bufs.items()]
    return Buffers(*nxt, store=bufs.store, propagated=rows)


def quantize_block(block: nn.Module, index: int, adapter: ModelAdapter, cfg: QuantizeConfig,
                   bufs: Buffers, ctx: dict, progress: bool,
                   init_provider: InitProvider | None = None) -> tuple[dict, dict, Buffers]:
    """Quantize one block in place. Returns (records by full name, report entry, next buffers)."""
    t0 = time.perf_counter()
    prefix = adapter.first_block_prefix().format(i=index)
    stages = active_stages(adapter, cfg, block)
    # the linears quantized (skips left out), their original weights
    names = [n for s in stages for n in stage_specs(cfg, s, prefix, block, adapter)]
    W_f = {n: adapter.weight(block, n).detach().clone() for n in names}
    bc = BlockContext(block, index, prefix, ctx, W_f, init_provider=init_provider)
    micro = cfg.train.micro_batch_size
    _cache_fp_targets(bc, adapter, bufs, micro, need_train=cfg.method == "gsq")
    records, stage_reports = {}, []
    for stage in stages:
        results, report = quantize_stage(bc, adapter, cfg, stage, bufs, progress)
        records.update({prefix + n: qw.to("cpu") for n, qw in results.items()})
        stage_reports.append(report)
    next_bufs = _propagate(bc, adapter, bufs, micro)
    target = bc.targets["block_val"]
    mse = float(((next_bufs.val - target).float() ** 2).mean())
    rel = mse / float((target.float() ** 2).mean())
    if not (mse == mse):
        raise GSQError(f"block {index}: quantized block output is not finite")
    report = {"block": index, "stages": stage_reports, "val_block_mse": mse,
              "val_block_rel_mse": rel, "seconds": round(time.perf_counter() - t0, 3)}
    return records, report, next_bufs


def activations_fit_device(tokens: int, hidden: int, free_bytes: int) -> bool:
    """Whether three fp32 copies of the calibration hidden states (block inputs, attention and
    block targets; `tokens` over every split) take less than half of a GPU's free memory. The
    other half is for the block, its training state and the stage's micro-batches: 17 GiB for a
    Llama-3.1-8B block at the gpu preset (benchmarks/RESULTS.md §14)."""
    return 3 * tokens * hidden * 4 < free_bytes // 2


def activation_home(cfg: QuantizeConfig, windows: dict[str, Tensor], hidden: int,
                    device: torch.device) -> torch.device:
    """Where the block inputs and FP targets live between uses (see `offload_activations`).

    Auto mode keeps them on the GPU when they fit (`activations_fit_device`; on every rank's
    GPU under several processes): host round trips cost more than the training itself on small
    models, and host memory is the scarcer on large ones.
    """
    if device.type != "cuda" or cfg.offload_activations:
        return torch.device("cpu")
    if cfg.offload_activations is False:
        return device
    tokens = sum(w.numel() for w in windows.values())
    free, _ = torch.cuda.mem_get_info(device)
    # ranks that do not fit, summed: every rank picks the same home (how `map_batches` shares
    # rows depends on it), the device only where it fits on every rank
    misses = torch.tensor([0.0 if activations_fit_device(tokens, hidden, free) else 1.0],
                          dtype=torch.float64)
    dist.all_reduce_sum([misses])
    return device if misses.item() == 0 else torch.device("cpu")


class BlockLoader:
    """How the block loop gets weights: this default serves a model held in memory, moving each
    block (and the embeddings) to the device for its turn. `gsq.models.streaming` has one that
    reads each block from disk into a model skeleton and drops it afterwards."""

    def load_embeddings(self, model: nn.Module, adapter: ModelAdapter,
                        device: torch.device) -> None:
        for module in adapter.embedding_modules(model):
            module.to(device)

    def release_embeddings(self, model: nn.Module, adapter: ModelAdapter) -> None:
        """After block-0 inputs and the block context are captured (in memory: kept)."""

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        self._home = next(block.parameters()).device
        block.to(device)

    def release(self, index: int, block: nn.Module) -> None:
        block.to(self._home)

    def load_module(self, model: nn.Module, module: nn.Module, device: torch.device) -> None:
        """A module outside the blocks (the final norm, the LM head), on `device` for a while."""
        self._homes = getattr(self, "_homes", {})
        self._homes[id(module)] = next(module.parameters()).device
        module.to(device)

    def release_module(self, model: nn.Module, module: nn.Module) -> None:
        module.to(self._homes.pop(id(module)))


# Called after each quantized block with (index, block still on the device, its records by
# full name, its report entry, the next block's inputs): writes or checkpoints the block.
BlockSink = Callable[[int, nn.Module, dict[str, QuantizedWeight], dict, Buffers], None]


@dataclass
class ResumePoint:
    """Where a resumed run continues: the first block to quantize and that block's inputs."""

    start: int
    bufs: Buffers


@dataclass
class RunStart:
    """What the block loop starts from: the blocks, how many to quantize, the block call kwargs,
    where activations live, the first block to quantize and its inputs for every split."""

    blocks: nn.ModuleList
    n_blocks: int
    ctx: dict[str, Any]
    home: torch.device
    bufs: Buffers
    start: int = 0


def prepare_run(model: nn.Module, adapter: ModelAdapter, windows: dict[str, Tensor],
                cfg: QuantizeConfig, device: torch.device, loader: BlockLoader | None = None,
                store: ActivationStore | None = None,
                resume: ResumePoint | None = None) -> RunStart:
    """Embeddings on the device, block context captured, block-0 inputs of the train/val/GPTQ
    windows `(N, T)` captured onto their home (`activation_home`; host tensors from `store`), or
    the inputs of `resume.start` taken over."""
    loader = loader or BlockLoader()
    blocks = adapter.blocks(model)
    n_blocks = min(len(blocks), cfg.max_blocks or len(blocks))
    loader.load_embeddings(model, adapter, device)
    ctx = capture_block_context(model, adapter, cfg.seqlen, device)
    home = activation_home(cfg, windows, model.config.hidden_size, device)
    if resume is not None:
        bufs = Buffers(*(x.to(home) for _, x in resume.bufs.items()), store=store)
    else:
        bufs = Buffers(*(capture_block_inputs(model, adapter, windows[s], device,
                                              cfg.train.micro_batch_size, home, store, shard=True)
                         for s in ("train", "val", "gptq")), store=store)
    loader.release_embeddings(model, adapter)
    return RunStart(blocks, n_blocks, ctx, home, bufs, resume.start if resume else 0)


def run_quantization(model: nn.Module, adapter: ModelAdapter, windows: dict[str, Tensor],
                     cfg: QuantizeConfig, device: torch.device, progress: bool = True,
                     init_provider: InitProvider | None = None, *,
                     loader: BlockLoader | None = None, sink: BlockSink | None = None,
                     store: ActivationStore | None = None, resume: ResumePoint | None = None,
                     block_hook: BlockHook | None = None,
                     ) -> tuple[dict[str, QuantizedWeight], dict]:
    """Quantize `model` in place, block by block, on calibration windows {train, val, gptq}
    `(N, T)`; `init_provider` replaces the GPTQ/RTN initialisation (see `InitProvider`),
    `block_hook` wraps each block's quantization (see `BlockHook`).

    loader: where block weights come from (default: the model in memory); sink: receives each
    finished block (then its records are not kept here); store: host activation tensors;
    resume: continue at `resume.start` from its inputs.
    Returns the records of every quantized linear (by full module name) kept here, and the run
    report (block entries of the blocks quantized by this call; `windows_propagated`: rows this
    process pushed through finished blocks, its share under several processes; `experts_solved`:
    MoE experts whose GPTQ this process solved, its own under several processes).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    loader = loader or BlockLoader()
    run = prepare_run(model, adapter, windows, cfg, device, loader, store, resume)
    blocks, n_blocks, ctx, bufs = run.blocks, run.n_blocks, run.ctx, run.bufs
    records, block_reports, propagated, solved = {}, [], 0, 0
    for index in tqdm(range(run.start, n_blocks), desc="blocks", unit="block",
                      initial=run.start, total=n_blocks, disable=not progress):
        block = blocks[index]
        loader.load(index, block, device)

        def quantize(block=block, index=index, bufs=bufs) -> BlockResult:
            return quantize_block(block, index, adapter, cfg, bufs, ctx, progress, init_provider)

        block_records, report, next_bufs = (block_hook(index, block, ctx, bufs, quantize)
                                            if block_hook else quantize())
        if sink is None:
            records.update(block_records)
        else:
            sink(index, block, block_records, report, next_bufs)
        loader.release(index, block)
        bufs = next_bufs
        propagated += next_bufs.propagated
        solved += sum(len(s.get("experts_solved", ())) for s in report["stages"])
        block_reports.append(report)
        log.info("block %d: rel. output MSE %.4g, %.1f s", index, report["val_block_rel_mse"],
                 report["seconds"])
    return records, {"blocks": block_reports, "quantize_seconds": time.perf_counter() - t0,
                     "blocks_quantized": n_blocks, "blocks_total": len(blocks),
                     "windows_propagated": propagated, "experts_solved": solved}
