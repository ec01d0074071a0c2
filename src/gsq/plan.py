"""`gsq plan`: what a quantize run will need, predicted before it starts from the model's config
and the run config alone (no weights are read).

The model is built on the meta device (shapes only) and the adapter names the quantized linears
of each stage. Memory counts what the block loop holds at its peaks: the current block in fp32 and
its original weights, the stored-dtype tensors being read or written, a stage's Hessians (GPTQ) or
training state (GSQ: logits, gradients, optimiser state, sampled probabilities), the calibration
activations (inputs, full-precision targets, the next block's inputs; in RAM, on the GPU or spilled
to disk), the embeddings while block-0 inputs are captured, and the process's own footprint
(measured while planning: the interpreter with torch and transformers loaded). Time counts the
FLOPs of the forward/backward passes and GPTQ solves and the element-wise work of the samplers, at
rates measured on this machine with two short kernels (or nominal rates for a GPU that is not
here). The report of a run carries the plan beside what was measured (`report.json`, "plan").
The end-to-end scale stage (`cfg.e2e`) runs after the block loop, on the whole model in memory
(one fp32 copy of the model) or streamed one block at a time (`gsq.calib.scale_stream`: one
block, the LM head, the boundary activations of one step, the teacher's states and the
multipliers with their Lion state; `e2e_plan`). `--e2e-streamed auto` streams it when the whole
model would not fit: over the host budget, or on a GPU over half of its free memory.

The plan is for one process: it has no notion of a torchrun launch. Under one, each process's
weights and training state are as planned, but the calibration activations are one shared copy
per node (memory-mapped files in `OUT.partial`, `gsq.calib.cache`), whatever the spill decision
says; the report's `ranks` holds each process's measured peak.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gsq.calib.sensitivity import BPW_WIDTHS, SENSITIVITY_WINDOWS
from gsq.calib.sequential import activations_fit_device, active_stages, stage_specs
from gsq.config import QuantizeConfig
from gsq.models.base import ModelAdapter
from gsq.models.moe import PAD_ELEMENTS

GIB = 2**30
# Host memory the run needs beyond the planning process's own: tokenizer, token stream,
# transformers' loading machinery, the allocator's retained pages. 160 MiB left 2-block GPTQ runs
# of 0.5B/1.3B/3B Llama shapes 0.45-0.67 GiB above the prediction (RESULTS.md §15, session 8).
RUN_OVERHEAD_BYTES = 600 * 2**20
# Nominal rates for a CUDA device this process cannot measure (an H100-class GPU: fp32 matmuls
# without TF32, element-wise kernels at about a third of its memory bandwidth).
NOMINAL_CUDA_RATES = (40e12, 2.5e11)
# Element-wise operations per relaxed weight and candidate in one sampler forward + backward
# (noise, softmax, weighted sum, their gradients), and per weight in one RTN/GPTQ scale search.
SAMPLER_OPS = 24
# Per weight and candidate scale of an RTN/GPTQ scale search (divide, round, clamp, multiply,
# |.|^2.4, sum); candidates per weight by search kind, both signs (`quant.grids`).
SEARCH_OPS_PER_CANDIDATE = 16.25
SEARCH_CANDIDATES = {"mse": 160, "absmax": 2}
SCALE_SEARCH_ELEMENTS = 2**24  # `search_group_scales`' chunk of candidates x weights at once


@dataclass(frozen=True)
class Shapes:
    """What the plan needs to know about a model (from its skeleton)."""

    n_blocks: int
    hidden: int
    attn_width: int  # heads x head_dim: the width of the attention values
    vocab: int
    block_params: int  # parameters of the largest block
    stages: dict[str, list[tuple[int, int]]]  # stage -> (out, in) of each quantized dense linear
    embed_params: int  # parameters of the modules run before block 0
    total_params: int
    stored_bytes: int  # bytes per parameter as stored (2 for bf16/fp16, 4 for fp32)
    # MoE: stage -> ONE routed expert's quantized linears, (out, in) per GPTQ group (the linears
    # of a group share one input stream, hence one Hessian per expert: gate/up, then down)
    expert_groups: dict[str, list[list[tuple[int, int]]]] = field(default_factory=dict)
    n_experts: int = 0  # routed experts per MoE layer
    top_k: int = 0  # experts each token is routed to

    def linears(self, stage: str) -> list[tuple[int, int]]:
        """(out, in) of every quantized linear of `stage`, each routed expert's included."""
        routed = [shape for group in self.expert_groups.get(stage, []) for shape in group]
        return self.stages.get(stage, []) + routed * self.n_experts

    def stage_names(self) -> list[str]:
        return list(dict.fromkeys([*self.stages, *self.expert_groups]))

    def quantized_weights(self) -> int:
        return sum(o * i for name in self.stage_names() for o, i in self.linears(name))

    def tokens_flops(self) -> int:
        """Matmul FLOPs per token through the quantized linears (an expert sees k/E of them)."""
        dense = sum(o * i for shapes in self.stages.values() for o, i in shapes)
        routed = sum(o * i for groups in self.expert_groups.values() for g in groups
                     for o, i in g)
        return 2 * (dense + self.top_k * routed)


def model_shapes(model: nn.Module, adapter: ModelAdapter, cfg: QuantizeConfig) -> Shapes:
    """Shapes of `model` (a skeleton on meta, or a loaded model) for the linears `cfg` quantizes
    (the largest block's; an MoE block's routed experts kept apart, one expert's worth)."""
    blocks = adapter.blocks(model)
    block = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    index = list(blocks).index(block)
    prefix = adapter.first_block_prefix().format(i=index)
    experts = list(adapter.experts(block).values())
    routed = {n for linears in experts for n in linears}
    stages, expert_groups = {}, {}
    for stage in active_stages(adapter, cfg, block):
        specs = stage_specs(cfg, stage, prefix, block, adapter)
        dense = [tuple(adapter.weight(block, n).shape) for n in specs if n not in routed]
        if dense:
            stages[stage.name] = dense
        first = [n for n in experts[0] if n in specs] if experts else []
        groups = [[tuple(adapter.weight(block, n).shape) for n in group]
                  for group in stage.gptq_groups(first)]
        if groups:
            expert_groups[stage.name] = groups
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = getattr(config, "dtype", None)
    stored = 4 if dtype in (None, torch.float32, "float32") else 2
    seen = {id(p): p for p in model.parameters()}  # a tied head counted once
    return Shapes(
        n_blocks=len(blocks), hidden=config.hidden_size, attn_width=heads * head_dim,
        vocab=config.vocab_size, block_params=sum(p.numel() for p in block.parameters()),
        stages=stages,
        embed_params=sum(p.numel() for m in adapter.embedding_modules(model)
                         for p in m.parameters()),
        total_params=sum(p.numel() for p in seen.values()), stored_bytes=stored,
        expert_groups=expert_groups, n_experts=len(experts) if expert_groups else 0,
        top_k=adapter.experts_per_token(block) if expert_groups else 0)


# --------------------------------------------------------------------------------------------
# Rates and budgets


@functools.lru_cache(maxsize=4)
def measure_rates(device_type: str) -> tuple[float, float]:
    """(matmul FLOP/s, element-wise element-ops/s) of this process on `device_type`, from two
    short fp32 kernels (about 0.3 s)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return NOMINAL_CUDA_RATES
    device = torch.device(device_type)
    a = torch.randn(512, 1024, device=device)
    b = torch.randn(1024, 1024, device=device)
    x = torch.randn(4 * 2**20, device=device)

    def timed(fn, reps: int) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    matmul = 2 * 512 * 1024 * 1024 / timed(lambda: a @ b, 8)
    elementwise = 3 * x.numel() / timed(lambda: torch.exp(x).mul_(0.5).add_(x), 8)
    return matmul, elementwise


def machine_memory_bytes() -> int:
    """Physical memory, or the container's memory limit (cgroup v2 / v1) when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_host_budget_gib() -> float:
    """Three quarters of the machine's (or the container's) memory."""
    return 0.75 * machine_memory_bytes() / GIB


def current_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------------------------
# The plan


def _codes(cfg: QuantizeConfig) -> int:
    """Candidates K per relaxed weight (gsq.quant.quantizers); with `--bpw` the widest width a
    linear may get."""
    bits = max(BPW_WIDTHS) if cfg.bpw is not None else cfg.bits
    return {2: 4, 3: 5, 4: 5}.get(bits, 2)


def activation_bytes(s: Shapes, cfg: QuantizeConfig) -> dict[str, int]:
    """Bytes of calibration hidden states: at the block loop's peak, and one set of inputs."""
    per_token = s.hidden * 4
    t, v, g = (n * cfg.seqlen for n in (cfg.nsamples, cfg.val_samples, cfg.gptq_samples))
    if cfg.method == "gsq":  # targets of train and val; the MLP stage's attention outputs
        peak = max((t + v + g) + 3 * (t + v), 2 * (t + v + g) + 2 * (t + v))
    else:  # val targets only
        peak = 2 * (t + v + g) + 2 * v
    return {"peak": peak * per_token, "inputs": (t + v + g) * per_token}


def routed_buffer_bytes(s: Shapes, cfg: QuantizeConfig, groups: list[list[tuple[int, int]]]
                        ) -> int:
    """The routed-token batches of one MoE Hessian pass (`MoEAdapter._add_routed`): a forward of
    `micro_batch_size` windows sends each expert its tokens, padded to the busiest expert's count
    (taken as 4x the mean, at most every token) and gathered in chunks of at most PAD_ELEMENTS
    values `(S, M, max(hidden, 2I))`; per chunk the gathered rows, the gate/up products and the
    down inputs, and S Gram matrices with the Hessian update's temporaries."""
    tokens = cfg.train.micro_batch_size * cfg.seqlen
    width = min(tokens, -(-4 * tokens * s.top_k // s.n_experts))  # M
    inter = max(o if o != s.hidden else i for group in groups for o, i in group)  # I
    row = width * max(s.hidden, 2 * inter)
    chunk = min(s.n_experts, max(1, PAD_ELEMENTS // row))  # S
    return 4 * (3 * chunk * row + 3 * chunk * max(s.hidden, inter) ** 2)


def stage_work_bytes(s: Shapes, cfg: QuantizeConfig) -> int:
    """Largest stage's working memory: GPTQ Hessians and solver copies, or GSQ training state
    (logits, their gradient, Lion's moment and the sampled probabilities, per candidate) plus a
    micro-batch's autograd activations. MoE experts: one Hessian per expert and input stream,
    the routed-token batches while they are collected, and the experts of a GPTQ group solved
    as one batch. One process: under torchrun (expert parallel, `gsq.dist`) a process solves
    only its own experts' batch; the plan has no process count and does not model that."""
    peak = 0
    k = _codes(cfg)
    for name in s.stage_names():
        dense, groups = s.stages.get(name, []), s.expert_groups.get(name, [])
        linears = s.linears(name)
        hessians = sum(i * i for _, i in dense) * 4
        solver = max((3 * i * i + 2 * o * i for o, i in dense), default=0) * 4
        routed = 0
        if groups:  # per expert one (in, in) Hessian per group; batches of all experts' linears
            hessians += s.n_experts * sum(g[0][1] ** 2 for g in groups) * 4 + s.hidden ** 2 * 4
            solver = max([solver] + [s.n_experts * sum(3 * i * i + 2 * o * i for o, i in g) * 4
                                     for g in groups])
            routed = routed_buffer_bytes(s, cfg, groups)
        if cfg.method == "gsq":
            hessians *= 2
        if cfg.method == "rtn":
            hessians = solver = routed = 0
        widest = max(o * i for o, i in linears)
        candidates = SEARCH_CANDIDATES[cfg.scale_search]
        search = 3 * min(candidates * widest, max(SCALE_SEARCH_ELEMENTS, widest)) * 4  # temps
        work = hessians + max(solver, search, routed)
        if cfg.method == "gsq":
            train = sum(o * i for o, i in linears) * 4 * (4 * k + 2)
            rows = max(o for o, _ in linears) * max(1, s.top_k if groups else 1)
            autograd = cfg.train.micro_batch_size * cfg.seqlen * (s.hidden + rows) * 4 * 6
            work = max(work, hessians + train + autograd)
        peak = max(peak, work)
    return peak


E2E_MODES = ("auto", "on", "off")


def e2e_plan(s: Shapes, cfg: QuantizeConfig, mode: str, on_gpu: bool, budget: float,
             baseline: int, free_device: float) -> dict:
    """Memory of the end-to-end scale stage and whether it streams (`mode` auto|on|off).

    Whole model: one fp32 copy on the host (the teacher, then the quantized model) and on the
    device. Streamed, on the device: one block in fp32 with its codes and the autograd state of
    one micro-batch, the LM head with one chunk of logits; on the host: the stored tensors being
    read, the multipliers (4 fp32 values per group: m, gradient, Lion moment, best snapshot) and
    the activations: the inputs of every block for one step, the teacher's states and the
    block-0 inputs of the stage's windows, and a second copy of the val states (held-out pass).
    The activations spill to memory-mapped files when they would push the host over `budget`."""
    from gsq.calib.scale_finetune import _KL_CHUNK

    whole = s.total_params * 4
    streams = {"on": True, "off": False}.get(mode)
    if streams is None:
        streams = baseline + whole > budget or (on_gpu and whole > free_device / 2)
    n_blocks = min(s.n_blocks, cfg.max_blocks or s.n_blocks)
    e2e, tokens = cfg.e2e, cfg.seqlen
    groups = s.quantized_weights() * n_blocks // cfg.group_size
    rows = max((o for name in s.stage_names() for o, _ in s.linears(name)), default=s.hidden)
    block = s.block_params * 4 + s.quantized_weights() * 4 + (
        e2e.micro_batch_size * tokens * (s.hidden + rows) * 4 * 6)
    head = s.vocab * s.hidden * 4 + min(_KL_CHUNK, e2e.micro_batch_size * tokens) * s.vocab * 16
    windows = min(e2e.windows or cfg.nsamples, cfg.nsamples)
    acts = (s.n_blocks + 1) * min(e2e.batch_size, windows) * tokens * s.hidden * 4 + (
        2 * windows + 3 * cfg.val_samples) * tokens * s.hidden * 4
    host = s.block_params * s.stored_bytes + groups * 4 * 4 + (0 if on_gpu else block + head)
    spilled = streams and baseline + host + acts > budget
    return {"streamed": streams, "whole": whole, "acts": acts, "spilled": spilled,
            "host": (host if streams else whole), "device": (block + head if streams else whole),
            "acts_in_ram": 0 if spilled else acts if streams else 0}


def time_per_block(s: Shapes, cfg: QuantizeConfig, rates: tuple[float, float]) -> float:
    """Seconds for one block: matmul FLOPs at the measured rate plus element-wise work."""
    matmul_rate, elem_rate = rates
    linears = [shape for name in s.stage_names() for shape in s.linears(name)]
    p_lin = sum(o * i for o, i in linears)
    attn = 4 * cfg.seqlen * s.attn_width  # scores and weighted values per token
    fwd = s.tokens_flops() + attn  # FLOPs per token through the block
    t, v, g = (n * cfg.seqlen for n in (cfg.nsamples, cfg.val_samples, cfg.gptq_samples))
    flops = fwd * (t + v + g)  # propagation
    search_ops = SEARCH_OPS_PER_CANDIDATE * SEARCH_CANDIDATES[cfg.scale_search]
    elem = search_ops * p_lin  # initial scale search
    if cfg.bpw is not None:  # the sensitivity pass: the block once, then per linear and width
        flops += fwd * SENSITIVITY_WINDOWS * cfg.seqlen * (1 + len(BPW_WIDTHS) * len(linears))
        elem += search_ops * p_lin * len(BPW_WIDTHS)
    if cfg.method != "rtn" and (cfg.method == "gptq" or cfg.init == "gptq"):
        flops += 5 * fwd * g + sum(2 * o * i * i + i ** 3 for o, i in linears)
    if cfg.method != "gsq":
        return flops / matmul_rate + elem / elem_rate + fwd * v / matmul_rate
    k = _codes(cfg)
    steps = cfg.train.epochs * max(1, cfg.nsamples // min(cfg.train.batch_size, cfg.nsamples))
    micro = -(-min(cfg.train.batch_size, cfg.nsamples) // cfg.train.micro_batch_size)
    flops += fwd * (t + v) * 2  # FP targets (attention + block) and the MLP inputs
    flops += 3 * fwd * t * cfg.train.epochs + 2 * fwd * v * cfg.train.epochs  # train, val
    for name in s.stage_names():
        shapes = s.linears(name)
        weights = sum(o * i for o, i in shapes)
        if name == "qk":
            flops += cfg.qk_steps * sum(6 * o * i * i for o, i in shapes) + fwd * v
            elem += cfg.qk_steps * SAMPLER_OPS * k * weights
        else:
            elem += steps * micro * SAMPLER_OPS * k * weights
    return flops / matmul_rate + elem / elem_rate


def plan(s: Shapes, cfg: QuantizeConfig, device: torch.device, host_budget_gib: float | None,
         baseline_bytes: int | None = None, rates: tuple[float, float] | None = None,
         e2e_streamed: str = "auto") -> dict:
    """Predicted peak host and GPU memory (GiB), disk (GiB) and seconds per block of a run.

    Activations stay on a GPU when three copies fit in half of its free memory (as the run
    decides, `activations_fit_device`; without a GPU here: of 80 GiB), else on the host, where
    they spill to disk when the host peak with them in RAM exceeds `host_budget_gib`. The e2e
    stage streams per `e2e_streamed` (`e2e_plan`)."""
    baseline = (current_rss_bytes() if baseline_bytes is None else baseline_bytes) \
        + RUN_OVERHEAD_BYTES
    budget = (default_host_budget_gib() if host_budget_gib is None else host_budget_gib) * GIB
    acts = activation_bytes(s, cfg)
    block = s.block_params * 4
    w_f = s.quantized_weights() * 4
    loading = s.block_params * s.stored_bytes + block  # stored tensors being upcast
    compute = block + w_f + stage_work_bytes(s, cfg)
    embeddings = s.embed_params * (4 + s.stored_bytes)
    on_gpu = device.type == "cuda"
    acts_home = "host"
    free = (torch.cuda.mem_get_info(device)[0] if on_gpu and torch.cuda.is_available()
            else 80 * GIB)
    if on_gpu and cfg.offload_activations is not True:
        tokens = (cfg.nsamples + cfg.val_samples + cfg.gptq_samples) * cfg.seqlen
        fits = activations_fit_device(tokens, s.hidden, free)
        acts_home = "device" if cfg.offload_activations is False or fits else "host"
    # the end-to-end scale stage (`gsq.api.finetune_output`), whole or streamed
    stage = e2e_plan(s, cfg, e2e_streamed, on_gpu, budget, baseline, free) \
        if cfg.e2e.epochs else None
    e2e_host, e2e_device = (stage["host"], stage["device"]) if stage else (0, 0)
    device_peak = max(loading, compute, embeddings, e2e_device) if on_gpu else 0
    host_weights = max(s.block_params * s.stored_bytes, e2e_host) if on_gpu else max(
        loading, compute, embeddings, e2e_host)
    host_acts = acts["peak"] if acts_home == "host" else 0
    peak_ram = max(baseline + host_weights + host_acts,
                   baseline + e2e_host + (stage["acts_in_ram"] if stage else 0))
    spill = acts_home == "host" and peak_ram > budget
    rates = rates or measure_rates(device.type)
    seconds = time_per_block(s, cfg, rates)
    n_blocks = min(s.n_blocks, cfg.max_blocks or s.n_blocks)
    quantized = s.quantized_weights() * n_blocks
    output = s.total_params * s.stored_bytes + quantized * (1 + 2 / cfg.group_size)
    return {
        "blocks": n_blocks, "blocks_total": s.n_blocks, "baseline_gib": baseline / GIB,
        "parameters": s.total_params, "block_parameters": s.block_params,
        "activations_home": acts_home, "activations_spilled": spill,
        # the e2e stage (0 / None when it is off): host memory of its weights and state, the
        # whole model's fp32 size, whether it streams, its activations and where they live
        "e2e_stage_gib": e2e_host / GIB,
        "e2e_whole_model_gib": stage["whole"] / GIB if stage else 0,
        "e2e_streamed": stage["streamed"] if stage else None,
        "e2e_activation_gib": stage["acts"] / GIB if stage and stage["streamed"] else 0,
        "e2e_activations_spilled": bool(stage and stage["spilled"]),
        "activation_gib": acts["peak"] / GIB,
        "peak_host_gib": max(baseline + host_weights + (0 if spill else host_acts),
                             baseline + e2e_host + (stage["acts_in_ram"] if stage else 0)) / GIB,
        "peak_host_gib_activations_in_ram": peak_ram / GIB,
        "host_budget_gib": budget / GIB,
        "peak_gpu_gib": (device_peak + (acts["peak"] if acts_home == "device" else 0)) / GIB
        if on_gpu else None,
        "disk_activations_gib": (acts["inputs"] + (acts["peak"] if spill else 0)) / GIB,
        "disk_output_gib": output / GIB,
        "seconds_per_block": seconds, "seconds_total": seconds * n_blocks,
        "rates": {"matmul_flops": rates[0], "elementwise_ops": rates[1]},
    }


def plan_for(model: nn.Module, adapter: ModelAdapter, cfg: QuantizeConfig,
             device: torch.device, host_budget_gib: float | None = None,
             e2e_streamed: str = "auto") -> dict:
    """`plan` of a model skeleton (or a loaded model)."""
    return plan(model_shapes(model, adapter, cfg), cfg, device, host_budget_gib,
                e2e_streamed=e2e_streamed)


def compare_plan(predicted: dict, report: dict, partial: Path) -> dict:
    """The plan beside what a run measured (for report.json): peak host RSS, peak CUDA memory,
    mean seconds per quantized block, and the size of the output written in `partial`."""
    seconds = [b["seconds"] for b in report.get("blocks", [])]
    written = sum(p.stat().st_size for sub in ("out", "codes") for p in (partial / sub).glob("*")
                  if p.is_file())
    measured = {"peak_host_gib": report.get("peak_host_rss_gib"),
                "peak_gpu_gib": report.get("peak_cuda_gib"),
                "seconds_per_block": sum(seconds) / len(seconds) if seconds else None,
                "disk_output_gib": written / GIB}
    return {"predicted": predicted, "measured": measured}


def source_config(model_source: str) -> tuple[str, object]:
    """(model_type, transformers config) of a model source from its config.json or GGUF keys;
    no weights are read."""
    from gsq.errors import GSQError
    from gsq.models.loading import peek_architecture, resolve_model_source

    source = resolve_model_source(model_source)
    model_type, config = peek_architecture(source)
    if config is None and str(source).lower().endswith(".gguf"):
        from transformers import AutoConfig

        path = Path(source)
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        config.dtype = torch.float32  # decoded GGUF tensors are handled in fp32
    if config is None:
        raise GSQError(f"cannot read the config of '{model_source}' (model type "
                       f"'{model_type}')")
    return model_type, config


def plan_source(model_source: str, cfg: QuantizeConfig, device: str = "cpu",
                host_budget_gib: float | None = None, e2e_streamed: str = "auto") -> dict:
    """`gsq plan`: the plan of quantizing `model_source` with `cfg` on `device`."""
    from gsq.models.registry import adapter_for
    from gsq.models.streaming import skeleton

    model_type, config = source_config(model_source)
    adapter = adapter_for(model_type)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = plan_for(skeleton(config), adapter, cfg, torch.device(device), host_budget_gib,
                      e2e_streamed)
    return {"model": model_source, "method": cfg.method, "device": device, **result}


def format_plan(p: dict) -> str:
    """A few lines for the terminal."""
    gpu = f", peak GPU {p['peak_gpu_gib']:.2f} GiB" if p["peak_gpu_gib"] is not None else ""
    where = {"host": "host RAM", "device": "the GPU"}[p["activations_home"]]
    if p["activations_spilled"]:
        where = "memory-mapped files (over the host budget)"
    return "\n".join([
        f"{p['model']}: {p['parameters'] / 1e9:.2f}B parameters, {p['blocks_total']} blocks of "
        f"{p['block_parameters'] / 1e6:.1f}M; {p['method']} on {p['device']}, "
        f"{p['blocks']} blocks",
        f"memory: peak host {p['peak_host_gib']:.2f} GiB (budget "
        f"{p['host_budget_gib']:.2f}){gpu}; activations {p['activation_gib']:.2f} GiB in {where}"
        + _e2e_line(p),
        f"disk: output {p['disk_output_gib']:.2f} GiB, activations "
        f"{p['disk_activations_gib']:.2f} GiB",
        f"time: {p['seconds_per_block']:.1f} s per block, {p['seconds_total'] / 3600:.2f} h "
        f"in all (rates: {p['rates']['matmul_flops'] / 1e9:.0f} GFLOP/s matmul, "
        f"{p['rates']['elementwise_ops'] / 1e9:.2f} G element-ops/s)",
    ])


def _e2e_line(p: dict) -> str:
    """The e2e stage's part of the memory line."""
    if p["e2e_streamed"] is None:
        return ""
    if not p["e2e_streamed"]:
        return f"; the e2e scale stage holds the whole model ({p['e2e_stage_gib']:.2f} GiB fp32)"
    where = "memory-mapped files" if p["e2e_activations_spilled"] else "host RAM"
    return (f"; the e2e scale stage streams one block at a time ({p['e2e_stage_gib']:.2f} GiB "
            f"on the host, activations {p['e2e_activation_gib']:.2f} GiB in {where}; the whole "
            f"model would take {p['e2e_whole_model_gib']:.2f} GiB)")
