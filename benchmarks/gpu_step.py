"""GPU micro-step benchmark: one Llama-3.1-8B-shaped decoder layer, plain vs torch vs fused sampler.

What one micro-step is (as in `gsq.quant.trainer`): soft weights for the trained linears (fresh
noise seed each micro-step), the layer forward on `batch x seq` tokens, an MSE loss against a
cached target (the layer with its original weights), and the backward, which accumulates into the
gradients of the previous micro-steps. One Lion step per `--micro-per-step` micro-steps (paper:
64 sequences of 4096 tokens per step = 64 micro-steps of 2 x 2048), timed separately and
amortised: step_ms = micro_ms + opt_ms / micro_per_step.

Rows (`--modes`, default all that apply to the device):
  plain          bf16 weights requiring grad (the baseline: no sampler), Lion on the weights
  torch-2bit     gsq quantizers, pure-torch sampler (CategoricalSample), fp32 logits, torch Lion
  torch-3bit     same, 3-bit shift quantizer (K = 5, clip)
  torch-ternary  same, ternary (2 logits)
  fused-2bit     Triton sampler, autograd accumulates the logit gradient, Triton Lion
  fused-2bit-acc Triton sampler adding the logit gradient into .grad in-kernel (accumulate_grad)
  fused-2bit-defer8 Triton sampler with DeferredGrads(8): one backward pass over the logits per
                 8 micro-steps (the micro-steps only copy their weight gradient)
  fused-2bit-bf16 as fused-2bit-acc with bf16 logits (the spec's bf16 option); -defer8 likewise
  fused-3bit-acc, fused-3bit-defer8, fused-3bit-mask-acc, fused-ternary-acc
Also measured in the same run: a GEMM ceiling (bf16 matmul TFLOP/s of each linear at batch x
seq tokens, and the GEMM-only time of the 7 linears' forward + backward), a copy ceiling (GB/s of
a 2 GiB device copy, read + write), the fused kernels alone on the gate_proj shape (ms, GB/s,
a tile/warps sweep) and a same-noise fused-vs-torch check on that shape.

Paper-budget projection (method §3.1, §6; Llama-3.1-8B: 32 layers; 4096 train sequences of 4096
tokens, 20 epochs, batch 64):
  micro-steps per stage  M = epochs * n_train * seq_paper / (batch * seq)       = 81,920
  optimiser steps        S = epochs * n_train / batch_paper                      = 1,280
  per layer  t_layer = 2000 * (t_q + t_k)                   (Q/K stage, quadratic loss, full batch)
                     + M * (t_vo + t_mlp) + S * (o_vo + o_mlp)   (V/O stage, MLP stage)
  total      H100-hours = 32 * t_layer / 3600
where t_q / t_k are one quadratic-loss step (soft W, tr(dW H dW^T), backward, Lion) of q_proj /
k_proj; t_vo one micro-step of the attention sub-block with soft v/o (q/k hard); t_mlp one
micro-step of the whole block with attention hard (forward only, no grad) and soft gate/up/down;
o_* the Lion step of that stage's parameters. Not included: GPTQ, the per-epoch validation
passes, pushing the buffers through each finished block, data loading. For comparison the joint
"all 7 linears on the block loss" micro-step gives 32 * (M * t_all7 + S * o_all7) / 3600.
Published: Llama-3.1-8B about 80 GPU-hours on 8 x H200 (paper Table 10).

    python benchmarks/gpu_step.py --json benchmarks/results/gpu-step-h100.json
    python benchmarks/gpu_step.py --dry-run        # tiny shapes, CPU, torch path only
    TRITON_INTERPRET=1 python benchmarks/gpu_step.py --dry-run   # + fused modes, interpreted
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

try:
    import gsq  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lion_pytorch import Lion  # noqa: E402

from gsq.calib.capture import capture_block_context  # noqa: E402
from gsq.calib.objectives import ActivationObjective  # noqa: E402
from gsq.models.registry import adapter_for  # noqa: E402
from gsq.models.synthetic import build_random_model, random_config  # noqa: E402
from gsq.quant.layerwise import QuadraticObjective  # noqa: E402
from gsq.quant.noise import derive_seed  # noqa: E402
from gsq.quant.quantizers import InitConfig, LogitQuantizer, make_quantizer  # noqa: E402
from gsq.quant.rtn import rtn_quantize  # noqa: E402
from gsq.quant.trainer import TrainConfig, make_optimizer  # noqa: E402
from gsq.quant.types import QuantSpec, parse_bits  # noqa: E402

BF16 = torch.bfloat16
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTN, MLP = LINEARS[:4], LINEARS[4:]
TAU, KAPPA = 1.0, 300.0  # mid-schedule values; timing does not depend on them
# Modes sharing quantizers (same bits, edge and logit dtype) are adjacent: they reuse them.
ALL_MODES = ("plain", "torch-2bit", "fused-2bit", "fused-2bit-acc", "fused-2bit-defer8",
             "fused-2bit-bf16", "fused-2bit-bf16-defer8", "torch-3bit", "fused-3bit-acc",
             "fused-3bit-defer8", "fused-3bit-mask-acc", "torch-ternary", "fused-ternary-acc")


@dataclass(frozen=True)
class Shape:
    """Decoder-layer geometry and micro-batch."""

    hidden: int = 4096
    ffn: int = 14336
    heads: int = 32
    kv_heads: int = 8
    batch: int = 2
    seq: int = 2048
    group_size: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear."""
        h, f, kv = self.hidden, self.ffn, self.kv_heads * self.head_dim
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}


# With TRITON_INTERPRET=1 a --dry-run on CPU also runs the fused modes (through the interpreter).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
PROJECTED = ("torch-2bit", "fused-2bit-acc", "fused-2bit-defer8", "fused-2bit-bf16",
             "fused-2bit-bf16-defer8")
TINY = Shape(hidden=64, ffn=128, heads=4, kv_heads=2, batch=1, seq=32, group_size=32)


# ---------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Mean milliseconds of `fn()` over `iters` calls after `warmup`: CUDA events on GPU,
    perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, fn, warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


# ---------------------------------------------------------------------------------------------
# One Llama-3 decoder layer: transformers' own module, run through gsq's llama adapter and
# objectives as the block loop runs it

# benchmark name -> the linear's path in the decoder layer
LINEAR_PATHS = {name: f"self_attn.{name}" for name in ATTN} | {name: f"mlp.{name}" for name in MLP}


def build_layer(shape: Shape, device: torch.device):
    """A one-layer Llama-3-shaped model of `shape` in bf16 on `device` (random weights from
    `gsq.models.synthetic`; vocabulary 256: the embedding is not timed, SDPA attention), the
    llama adapter, and the block-call keyword arguments for `shape.seq` tokens (rope, mask)."""
    config = random_config("llama3", 256, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                           num_hidden_layers=1, num_attention_heads=shape.heads,
                           num_key_value_heads=shape.kv_heads,
                           max_position_embeddings=max(shape.seq, 8192))
    config._attn_implementation = "sdpa"
    model = build_random_model(config).to(device=device, dtype=BF16)
    adapter = adapter_for(config.model_type)
    return model, adapter, capture_block_context(model, adapter, shape.seq, device)


def stage_forward(kind: str, adapter, kwargs: dict):
    """`fn(block, h)` of a micro-step kind: the whole layer ("all7"), the attention sub-block
    ("vo"), or the MLP after a frozen, forward-only attention ("mlp")."""
    if kind == "all7":
        return lambda block, h: adapter.block_forward(block, h, kwargs)
    if kind == "vo":
        return lambda block, h: adapter.attention_residual(block, h, kwargs)

    def mlp(block, h):
        with torch.no_grad():
            h = adapter.attention_residual(block, h, kwargs)
        return adapter.mlp_residual(block, h)

    return mlp


def objective(ctx, kind: str, target: torch.Tensor) -> ActivationObjective:
    """gsq's block objective (MSE of the sub-block with trial weights against `target`) on the
    one micro-batch `ctx["x"]`."""
    batch = (ctx["x"], target)
    return ActivationObjective(ctx["block"], stage_forward(kind, ctx["adapter"], ctx["kwargs"]),
                               batch, batch, ctx["x"].shape[0], ctx["device"])


# ---------------------------------------------------------------------------------------------
# Samplers and optimisers


def build_quantizers(weights, names, bits, edge: str, logits_dtype, group_size: int,
                     device) -> dict[str, LogitQuantizer]:
    """gsq quantizers around RTN codes of `weights[name]` (logits in `logits_dtype`)."""
    spec = QuantSpec(parse_bits(bits), group_size)
    cfg = InitConfig(shift_edge=edge, logits_dtype=logits_dtype)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name in names:
        init = rtn_quantize(weights[name].float(), spec)
        out[name] = make_quantizer(init, cfg, gen).to(device)
        del init
    return out


def soft_weight(q: LogitQuantizer, seed: int, impl) -> torch.Tensor:
    """One soft weight in bf16: `impl` = "torch" | "fused" | "fused-acc" | a DeferredGrads."""
    g = q.spec.group_size
    if impl == "torch":  # explicitly the torch path, whatever q.soft dispatches to
        from gsq.quant.sampler import CategoricalSample, TernarySample

        if q.spec.is_ternary:
            return TernarySample.apply(q.logits, q.scale, KAPPA, TAU, seed, g, q.scale_dtype, BF16)
        return CategoricalSample.apply(q.logits, q.scale, q.values, getattr(q, "valid", None),
                                       KAPPA, TAU, seed, g, q.scale_dtype, BF16)
    from gsq.kernels.sampler_triton import FusedCategoricalSample, FusedTernarySample

    acc = impl == "fused-acc" if isinstance(impl, str) else impl  # a DeferredGrads
    if q.spec.is_ternary:
        return FusedTernarySample.apply(q.logits, q.scale, KAPPA, TAU, seed, g, q.scale_dtype,
                                        BF16, acc)
    return FusedCategoricalSample.apply(q.logits, q.scale, q.values, getattr(q, "valid", None),
                                        KAPPA, TAU, seed, g, q.scale_dtype, BF16, acc)


def quantizer_lion(quantizers: dict[str, LogitQuantizer], fused: bool):
    """The trainer's Lion (`gsq.quant.trainer.make_optimizer`), with lion_pytorch's Triton update
    for the fused rows on CUDA; (optimizer, description)."""
    use_triton = fused and all(q.logits.is_cuda for q in quantizers.values())
    cfg = TrainConfig()
    opt = make_optimizer(quantizers, cfg, cfg.logit_lr, use_triton=use_triton)
    return opt, f"lion_pytorch{' (triton)' if use_triton else ''}"


# ---------------------------------------------------------------------------------------------
# Micro-steps


class Step:
    """A micro-step: `weights()` (linear path -> weight, soft or plain) put into the layer, gsq's
    block objective on the micro-batch, and the backward."""

    def __init__(self, objective: ActivationObjective, weights) -> None:
        self.objective, self.weights = objective, weights
        self.everything = torch.arange(objective.n_train)

    def __call__(self) -> None:
        self.objective.loss(self.weights(), self.everything).backward()


def soft_weights(quantizers: dict[str, LogitQuantizer], impl):
    """`weights()` for a Step: fresh soft weights of `quantizers` per call (new noise seed)."""
    count = 0

    def weights() -> dict[str, torch.Tensor]:
        nonlocal count
        count += 1
        return {LINEAR_PATHS[name]: soft_weight(q, derive_seed(0, qi, count), impl)
                for qi, (name, q) in enumerate(quantizers.items())}

    return weights


class QuadraticStep:
    """Q/K stage step: gsq's quadratic objective tr(dW H dW^T) of one soft linear (full batch),
    then Lion."""

    def __init__(self, name: str, q: LogitQuantizer, W_f: torch.Tensor, impl: str, opt):
        cols = W_f.shape[1]
        gen = torch.Generator(device=W_f.device).manual_seed(1)
        X = torch.randn(cols, cols, device=W_f.device, generator=gen) / math.sqrt(cols)
        H = X @ X.T
        self.objective = QuadraticObjective(name, W_f, H, H)
        self.name, self.q, self.impl, self.opt, self.count = name, q, impl, opt, 0

    def __call__(self) -> None:
        self.count += 1
        W = soft_weight(self.q, derive_seed(1, self.count), self.impl)
        self.objective.loss({self.name: W}, None).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Modes


def parse_mode(mode: str) -> dict:
    """'fused-3bit-mask-acc' -> impl fused-acc, bits 3, edge mask, logits fp32;
    '...-defer8' -> impl fused-defer, defer 8."""
    parts = mode.split("-")
    impl, defer = parts[0], 0
    if "acc" in parts or "bf16" in parts:
        impl = "fused-acc"
    for part in parts:
        if part.startswith("defer"):
            impl, defer = "fused-defer", int(part[5:])
    bits = {"2bit": 2, "3bit": 3, "ternary": "ternary"}[parts[1]]
    return {"impl": impl, "defer": defer, "bits": bits,
            "edge": "mask" if "mask" in parts else "clip",
            "logits_dtype": BF16 if "bf16" in parts else torch.float32}


def run_plain(ctx, timer, args) -> dict:
    params = {LINEAR_PATHS[n]: ctx["weights"][n].clone().requires_grad_(True) for n in LINEARS}
    step = Step(objective(ctx, "all7", ctx["target"]), lambda: params)
    opt = Lion(list(params.values()), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    micro = timer.ms(step, args.warmup, args.iters)
    opt_ms = timer.ms(opt.step, 1, 3)
    return {"micro_ms": micro, "opt_ms": opt_ms, "optimizer": "lion_pytorch"}


def run_quantized(ctx, timer, args, mode: str, projection: bool) -> dict:
    """All-7 micro-step of one sampler mode (and, with `projection`, the staged steps)."""
    m = parse_mode(mode)
    fused = m["impl"] != "torch"
    qs = cached_quantizers(ctx, m)
    opt, lion = quantizer_lion(qs, fused)
    impl = m["impl"]
    if impl == "fused-defer":
        from gsq.kernels.sampler_triton import DeferredGrads

        impl = DeferredGrads(m["defer"])
    try:
        return _time_quantized(ctx, timer, args, qs, opt, lion, impl, fused, projection)
    finally:
        if not isinstance(impl, str):
            impl.close()


def _window(args, impl) -> tuple[int, int]:
    """(warmup, iters): with DeferredGrads(n), whole batches of n so that the timed window holds
    exactly iters / n flushes (the pending ones are flushed first)."""
    if isinstance(impl, str):
        return args.warmup, args.iters
    impl.flush()
    n = impl.n
    return n * math.ceil(args.warmup / n), n * math.ceil(args.iters / n)


def _time_quantized(ctx, timer, args, qs, opt, lion, impl, fused, projection) -> dict:
    step = Step(objective(ctx, "all7", ctx["target"]), soft_weights(qs, impl))
    micro = timer.ms(step, *_window(args, impl))
    opt_ms = timer.ms(opt.step, 1, 3)
    # peak of the all-7 step itself (the staged timings below hold a second optimiser)
    row = {"micro_ms": micro, "opt_ms": opt_ms, "optimizer": lion,
           "peak_gib": peak_gib(ctx["device"])}
    if projection:
        opt.zero_grad(set_to_none=True)
        row["stages"] = stage_times(ctx, timer, args, qs, impl, fused)
    opt.zero_grad(set_to_none=True)
    return row


def cached_quantizers(ctx, m: dict) -> dict[str, LogitQuantizer]:
    """The quantizers of mode `m`, reused by adjacent modes with the same (bits, edge, dtype);
    gradients cleared. Other cached quantizers are dropped first (peak memory per mode)."""
    key = (m["bits"], m["edge"], m["logits_dtype"])
    cached = ctx.get("qcache")
    if cached is None or cached[0] != key:
        ctx["qcache"] = None
        reset_peak(ctx["device"])
        qs = build_quantizers(ctx["weights"], LINEARS, m["bits"], m["edge"], m["logits_dtype"],
                              ctx["shape"].group_size, ctx["device"])
        ctx["qcache"] = (key, qs)
    qs = ctx["qcache"][1]
    for q in qs.values():
        q.zero_grad(set_to_none=True)
    return qs


def stage_times(ctx, timer, args, qs, impl, fused) -> dict:
    """Per-stage micro-step and optimiser times for the projection (see module doc)."""
    out = {}
    for kind, names in (("vo", ("v_proj", "o_proj")), ("mlp", MLP)):
        sub = {n: qs[n] for n in names}
        target = ctx["target_attn"] if kind == "vo" else ctx["target"]
        step = Step(objective(ctx, kind, target), soft_weights(sub, impl))
        opt, _ = quantizer_lion(sub, fused)
        out[f"t_{kind}"] = timer.ms(step, *_window(args, impl))
        out[f"o_{kind}"] = timer.ms(opt.step, 1, 3)
        opt.zero_grad(set_to_none=True)
    for name in ("q_proj", "k_proj"):
        opt, _ = quantizer_lion({name: qs[name]}, fused)
        step = QuadraticStep(name, qs[name], ctx["weights"][name], impl, opt)
        out[f"t_{name[0]}"] = timer.ms(step, 2, max(3, args.iters // 2))
        del step, opt
    return out


def project(stages: dict, args) -> dict:
    """Paper-budget H100-hours from the stage times (formula in the module doc)."""
    micro = args.epochs * args.n_train * args.seq_paper / (args.micro_batch_tokens())
    steps = args.epochs * args.n_train / args.batch_paper
    layer_s = (args.qk_steps * (stages["t_q"] + stages["t_k"])
               + micro * (stages["t_vo"] + stages["t_mlp"])
               + steps * (stages["o_vo"] + stages["o_mlp"])) / 1e3
    return {"micro_steps_per_stage": micro, "opt_steps_per_stage": steps,
            "layer_hours": layer_s / 3600, "total_gpu_hours": args.layers * layer_s / 3600}


def project_joint(row: dict, args) -> float:
    micro = args.epochs * args.n_train * args.seq_paper / args.micro_batch_tokens()
    steps = args.epochs * args.n_train / args.batch_paper
    return args.layers * (micro * row["micro_ms"] + steps * row["opt_ms"]) / 1e3 / 3600


# ---------------------------------------------------------------------------------------------
# Ceilings and kernel-only timings


def gemm_ceiling(shape: Shape, device, timer) -> dict:
    """bf16 `x @ W^T` TFLOP/s per linear at batch*seq tokens, and the 7 linears' fwd+bwd GEMM
    time (3 GEMMs of equal flops each) at those rates."""
    M = shape.tokens
    per, floor_ms = {}, 0.0
    for name, (o, i) in shape.linear_shapes().items():
        x = torch.randn(M, i, device=device, dtype=BF16)
        w = torch.randn(o, i, device=device, dtype=BF16)
        ms = timer.ms(lambda x=x, w=w: x @ w.T, 3, 10)
        per[name] = 2 * M * o * i / (ms * 1e-3) / 1e12
        floor_ms += 3 * ms
        del x, w
    return {"tflops": per, "linears_fwd_bwd_ms": floor_ms}


def copy_ceiling(device, timer, gib: float) -> dict:
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=BF16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = timer.ms(lambda: dst.copy_(src), 2, 10)
    return {"bytes": 2 * n, "gbps": 2 * (2 * n) / (ms * 1e-3) / 1e9, "ms": ms}


def kernel_bench(shape: Shape, device, timer) -> dict:
    """Fused sampler kernels alone on gate_proj, 2-bit, fp32 logits: a tile/warps sweep, the
    effective GB/s (bytes the kernel must move), and a same-noise check against the torch path."""
    from gsq.kernels import sampler_triton as st
    from gsq.quant import sampler as sm

    o, i = shape.linear_shapes()["gate_proj"]
    g, k = shape.group_size, 4
    gen = torch.Generator(device=device).manual_seed(2)
    logits = (torch.randn(k, o, i, device=device, generator=gen) * 0.05).requires_grad_()
    scale = (torch.randn(o, i // g, device=device, generator=gen) * 0.02).requires_grad_()
    values = torch.tensor([-2.0, -1.0, 0.0, 1.0], device=device).view(4, 1, 1)
    G = torch.randn(o, i, device=device, generator=gen).to(BF16)
    args = (values, None, KAPPA, TAU, 123, g, BF16, BF16)
    n = o * i
    fwd_bytes, bwd_bytes = n * (4 * k + 2), n * (4 * k + 2 + 4 * k * 2)  # bwd: accumulate
    saved = (st.TILE_ELEMS, st.NUM_WARPS, st.PHILOX_ROUNDS, st.FAST_LOG_ENABLED)
    sweep = []
    logits.grad = torch.zeros_like(logits)
    # (tile, warps, Philox rounds, MUFU log): layouts, then two compute-sensitivity probes
    configs = ((512, 4, 10, True), (1024, 4, 10, True), (1024, 8, 10, True), (2048, 8, 10, True),
               (256, 2, 10, True), (512, 4, 7, True), (512, 4, 10, False))
    for tile, warps, rounds, fast in configs:
        st.TILE_ELEMS, st.NUM_WARPS, st.PHILOX_ROUNDS, st.FAST_LOG_ENABLED = (tile, warps, rounds,
                                                                               fast)
        with torch.no_grad():
            f_ms = timer.ms(lambda: st.FusedCategoricalSample.apply(logits, scale, *args), 2, 10)

        def fwd_bwd():
            st.FusedCategoricalSample.apply(logits, scale, *args, True).backward(G)

        fb_ms = timer.ms(fwd_bwd, 2, 10)
        sweep.append({"tile": tile, "warps": warps, "philox_rounds": rounds, "fast_log": fast,
                      "fwd_ms": f_ms, "bwd_ms": fb_ms - f_ms,
                      "fwd_gbps": fwd_bytes / (f_ms * 1e-3) / 1e9,
                      "bwd_gbps": bwd_bytes / max(fb_ms - f_ms, 1e-6) * 1e3 / 1e9})
    st.TILE_ELEMS, st.NUM_WARPS, st.PHILOX_ROUNDS, st.FAST_LOG_ENABLED = saved
    logits.grad = None
    with torch.no_grad():
        t_ms = timer.ms(lambda: sm.CategoricalSample.apply(logits, scale, *args), 1, 3)
    return {"shape": [k, o, i], "sweep": sweep, "torch_fwd_ms": t_ms,
            "check": same_noise_check(st, sm, logits, scale, args, G)}


def same_noise_check(st, sm, logits, scale, args, G) -> dict:
    """Max relative differences fused vs torch (torch fed the kernels' uniforms)."""
    real = sm.seeded_uniform
    sm.seeded_uniform = st.triton_uniform
    try:
        res = []
        for fn in (st.FusedCategoricalSample.apply, sm.CategoricalSample.apply):
            W = fn(logits, scale, *args)
            res.append((W.detach().float(), *torch.autograd.grad((W * G).sum(), (logits, scale))))
            del W
    finally:
        sm.seeded_uniform = real

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max())

    (w, gl, gs), (w_r, gl_r, gs_r) = res
    return {"forward": rel(w, w_r), "logits_grad": rel(gl, gl_r), "scale_grad": rel(gs, gs_r)}


# ---------------------------------------------------------------------------------------------
# Report


def table(rows: dict, plain_ms: float | None, torch2_ms: float | None) -> str:
    head = ("| mode | micro-step ms | Lion ms | step ms (amortised) | x plain | speed-up vs "
            "torch-2bit | peak GiB | optimizer |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} |  |  |  |  |  |  |")
            continue
        s = r["step_ms"]
        xp = f"{s / plain_ms:.2f}" if plain_ms else "-"
        sp = f"{torch2_ms / s:.2f}" if torch2_ms else "-"
        pk = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        lines.append(f"| {name} | {r['micro_ms']:.2f} | {r['opt_ms']:.2f} | {s:.2f} | {xp} | "
                     f"{sp} | {pk} | {r['optimizer']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for the projection formula.")
    p.add_argument("--json", type=Path, help="write all results as JSON here")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on CPU, torch path only (checks the script without a GPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--modes", nargs="+", default=None, choices=ALL_MODES)
    p.add_argument("--hidden", type=int, default=Shape.hidden)
    p.add_argument("--ffn", type=int, default=Shape.ffn)
    p.add_argument("--heads", type=int, default=Shape.heads)
    p.add_argument("--kv-heads", type=int, default=Shape.kv_heads)
    p.add_argument("--batch", type=int, default=Shape.batch, help="sequences per micro-step")
    p.add_argument("--seq", type=int, default=Shape.seq, help="tokens per sequence")
    p.add_argument("--group-size", type=int, default=Shape.group_size)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--micro-per-step", type=int, default=64,
                   help="micro-steps per Lion step (paper: 64 x 4096 tokens / (batch x seq))")
    p.add_argument("--no-projection", action="store_true", help="skip the staged timings")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel-only timings")
    p.add_argument("--copy-gib", type=float, default=2.0)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--n-train", type=int, default=4096, help="training sequences")
    p.add_argument("--seq-paper", type=int, default=4096, help="tokens per training sequence")
    p.add_argument("--batch-paper", type=int, default=64, help="sequences per optimiser step")
    p.add_argument("--qk-steps", type=int, default=2000, help="Q/K stage full-batch steps")
    args = p.parse_args(argv)
    args.micro_batch_tokens = lambda: args.batch * args.seq
    return args


def setup(args) -> dict:
    if args.dry_run:
        shape = TINY  # the projection keeps the paper's numbers
        args.warmup, args.iters, args.copy_gib = 1, 2, 0.01
        args.batch, args.seq = TINY.batch, TINY.seq
    else:
        shape = Shape(args.hidden, args.ffn, args.heads, args.kv_heads, args.batch, args.seq,
                      args.group_size)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dry_run and args.device is None:
        device = torch.device("cpu")
    model, adapter, kwargs = build_layer(shape, device)
    block = adapter.blocks(model)[0]
    weights = {name: block.get_submodule(path).weight.detach()
               for name, path in LINEAR_PATHS.items()}
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(shape.batch, shape.seq, shape.hidden, device=device, generator=gen).to(BF16)
    with torch.no_grad():
        target_attn = adapter.attention_residual(block, x, kwargs)
        target = adapter.mlp_residual(block, target_attn)
    return {"shape": shape, "device": device, "block": block, "adapter": adapter,
            "kwargs": kwargs, "weights": weights, "x": x, "target": target,
            "target_attn": target_attn}


def default_modes(device) -> list[str]:
    if device.type != "cuda" and not INTERPRET:
        return ["plain", "torch-2bit", "torch-3bit", "torch-ternary"]
    return list(ALL_MODES)


def run_mode(name, ctx, timer, args) -> dict:
    reset_peak(ctx["device"])
    try:
        if name == "plain":
            row = run_plain(ctx, timer, args)
        else:
            projection = not args.no_projection and name in PROJECTED
            row = run_quantized(ctx, timer, args, name, projection)
    except Exception as exc:  # noqa: BLE001 - one failing mode must not lose the others
        return {"error": f"{type(exc).__name__}: {exc}"}
    row["step_ms"] = row["micro_ms"] + row["opt_ms"] / args.micro_per_step
    row.setdefault("peak_gib", peak_gib(ctx["device"]))
    if "stages" in row:
        row["projection"] = project(row["stages"], args)
    row["joint_all7_gpu_hours"] = project_joint(row, args)
    reset_peak(ctx["device"])
    return row


def environment(device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    with contextlib.suppress(ImportError):
        import triton

        env["triton"] = triton.__version__
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    ctx = setup(args)
    device, timer = ctx["device"], Timer(ctx["device"])
    modes = args.modes or default_modes(device)
    if device.type != "cuda" and not INTERPRET:
        modes = [m for m in modes if not m.startswith("fused")]
    result = {"env": environment(device), "shape": asdict(ctx["shape"]), "modes": {},
              "micro_per_step": args.micro_per_step}
    for name in modes:
        result["modes"][name] = run_mode(name, ctx, timer, args)
        print(f"[{time.perf_counter() - t0:6.1f}s] {name}: "
              f"{json.dumps(result['modes'][name], default=str)[:300]}", flush=True)
    result["gemm_ceiling"] = gemm_ceiling(ctx["shape"], device, timer)
    result["copy_ceiling"] = copy_ceiling(device, timer, args.copy_gib)
    if (device.type == "cuda" or INTERPRET) and not args.no_kernels:
        try:
            result["kernels"] = kernel_bench(ctx["shape"], device, timer)
        except Exception as exc:  # noqa: BLE001
            result["kernels"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = time.perf_counter() - t0
    report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


def report(result: dict) -> None:
    rows = result["modes"]
    plain = rows.get("plain", {}).get("step_ms")
    torch2 = rows.get("torch-2bit", {}).get("step_ms")
    print(f"\n{result['env']}  shape {result['shape']}\n")
    print(table(rows, plain, torch2))
    gc_ = result["gemm_ceiling"]
    print("\nGEMM ceiling TFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in gc_["tflops"].items())
          + f"; 7 linears fwd+bwd GEMMs alone: {gc_['linears_fwd_bwd_ms']:.2f} ms")
    print(f"copy ceiling: {result['copy_ceiling']['gbps']:.0f} GB/s")
    for name, r in rows.items():
        if "projection" in r:
            p = r["projection"]
            print(f"paper budget, staged ({name}): {p['total_gpu_hours']:.1f} GPU-hours "
                  f"({p['layer_hours'] * 60:.1f} min per layer); joint all-7: "
                  f"{r['joint_all7_gpu_hours']:.1f}")
    k = result.get("kernels")
    if k and "sweep" in k:
        for s in k["sweep"]:
            print(f"kernels tile {s['tile']} warps {s['warps']} rounds {s['philox_rounds']} "
                  f"fast-log {s['fast_log']}: fwd {s['fwd_ms']:.2f} ms "
                  f"({s['fwd_gbps']:.0f} GB/s), bwd {s['bwd_ms']:.2f} ms "
                  f"({s['bwd_gbps']:.0f} GB/s)")
        print(f"same-noise check vs torch: {k['check']}")
    elif k:
        print(f"kernels: {k}")


if __name__ == "__main__":
    raise SystemExit(main())
