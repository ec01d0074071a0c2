"""Configuration of a quantization run, validated on construction.

`QuantizeConfig` holds everything a run depends on; it is written into the output directory so a
result can be traced to its settings. Presets (`cpu_preset`, `gpu_preset`, `paper_preset`) give
budgets for a 2-core laptop-class CPU, a single GPU, and the paper's recipe.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

import torch

from gsq.errors import GSQError
from gsq.quant.quantizers import InitConfig
from gsq.quant.target import fallback_target, parse_target, target_spec, target_type
from gsq.quant.trainer import TrainConfig
from gsq.quant.types import QuantSpec, parse_bits

METHODS = ("gsq", "gptq", "rtn")
E2E_LOSSES = ("kl",)
SCOPES = ("all", "mlp-only")


@dataclass(frozen=True)
class E2EConfig:
    """The end-to-end scale stage after the block loop (method §12, `gsq.calib.scale_finetune`):
    group scales (and optionally RMSNorm weights) of the whole quantized model trained on
    KL(full precision || quantized) of the next-token distribution, codes frozen."""

    epochs: int = 0  # passes over the training windows; 0 = stage off
    windows: int | None = None  # training windows used (the first N of the train split); None: all
    # Lion lr, relative: every step moves each scale (norm weight) by lr x its input value
    lr: float = 1e-3
    batch_size: int = 4  # windows per optimiser step
    micro_batch_size: int = 4  # windows per forward/backward
    norms: bool = False  # also train the RMSNorm weights (full precision, relative steps too)
    betas: tuple[float, float] = (0.9, 0.95)
    lr_final_frac: float = 0.1  # cosine decay of the lr to this fraction
    loss: str = "kl"

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"e2e epochs must be >= 0; got {self.epochs}")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("e2e batch sizes must be >= 1")
        if self.windows is not None and self.windows < 1:
            raise ValueError(f"e2e windows must be >= 1; got {self.windows}")
        if not self.lr > 0:
            raise ValueError(f"e2e lr must be > 0; got {self.lr}")
        if self.loss not in E2E_LOSSES:
            raise ValueError(f"e2e loss must be one of {', '.join(E2E_LOSSES)}; got {self.loss!r}")


@dataclass(frozen=True)
class QuantizeConfig:
    method: str = "gsq"  # "gsq", or the baselines "gptq" / "rtn"
    bits: int | str = 2  # 2, 3, 4 or "ternary"
    group_size: int = 128  # input columns per scale
    init: str = "gptq"  # GSQ initialiser: "gptq" or "rtn"
    scope: str = "all"  # "all" linears of each block (paper, staged) or "mlp-only" (reference code)
    gsq_stages: tuple[str, ...] = ("qk", "vo", "mlp")  # stages GSQ trains; others keep the init
    skip: tuple[str, ...] = ()  # fnmatch patterns of full module names kept in full precision
    bits_overrides: tuple[tuple[str, int | str], ...] = ()  # (pattern, bits) per-module bit-widths
    # average bits per parameter of the quantized linears (codes + scales): widths of 2/3/4 bit
    # allocated by measured sensitivity (`gsq.calib.sensitivity`); None = `bits` everywhere
    bpw: float | None = None
    nsamples: int = 128  # training sequences
    val_samples: int = 16  # held-out calibration sequences (validation, best-epoch choice)
    gptq_samples: int = 64  # sequences for GPTQ Hessians (disjoint from train and val)
    seqlen: int = 512  # tokens per calibration sequence
    train: TrainConfig = field(default_factory=TrainConfig)  # block-objective stages (vo, mlp)
    qk_steps: int = 2000  # full-batch steps of the Q/K quadratic stage (paper: 2,000)
    init_cfg: InitConfig = field(default_factory=InitConfig)
    percdamp: float = 0.1  # GPTQ damping, fraction of mean diag(H)
    gptq_block_size: int = 128
    static_groups: bool = False  # GPTQ: all group scales searched before the solve
    scale_search: str = "mse"  # RTN/GPTQ scale choice: "mse" or "absmax" (quant.types)
    # GPTQ: solve columns by decreasing diag(H) ("desc_act") on the same group-wise grid;
    # implies static_groups
    act_order: bool = False
    seed: int = 0
    # Where calibration activations live between uses: True = host, False = the device,
    # None = the device when they fit in half of its free memory (three fp32 copies), else the host.
    offload_activations: bool | None = None
    max_blocks: int | None = None  # quantize only the first N blocks (smoke tests, comparisons)
    # GGUF type to optimise for ("Q2_K", "gguf:Q4_0", ...; `gsq.quant.target`): bits and group
    # size must be ones the type holds (`targeting` fills them in); None = bf16 group scales
    target: str | None = None
    # type of the tensors whose rows are not whole `target` blocks; None = llama.cpp's rule
    fallback: str | None = None
    # end-to-end scale stage after the block loop (off unless a preset or the user turns it on)
    e2e: E2EConfig = field(default_factory=E2EConfig)
    # MoE: an expert routed fewer calibration tokens than this in the GPTQ split gets its GPTQ
    # Hessians from every token entering its layer (as if the router had sent it them all); one
    # routed fewer in the train split keeps its initial (GPTQ/RTN) codes instead of GSQ training.
    # Both are listed in report.json ("moe").
    moe_min_tokens: int = 64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.init not in ("gptq", "rtn"):
            raise ValueError(f"init must be 'gptq' or 'rtn'; got {self.init!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {self.scope!r}")
        object.__setattr__(self, "bits", parse_bits(self.bits))
        QuantSpec(self.bits, self.group_size, scale_search=self.scale_search)  # validates
        for _, bits in self.bits_overrides:
            parse_bits(bits)
        if min(self.nsamples, self.val_samples, self.gptq_samples) < 1:
            raise ValueError("nsamples, val_samples and gptq_samples must be >= 1")
        if self.qk_steps < 0:
            raise ValueError(f"qk_steps must be >= 0; got {self.qk_steps}")
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be >= 2; got {self.seqlen}")
        if self.bpw is not None and not self.bpw > 0:
            raise ValueError(f"bpw must be > 0; got {self.bpw}")
        if self.bpw is not None and self.bits_overrides:
            raise ValueError("bpw (a bits-per-weight target) and per-module bit-widths exclude "
                             "each other")
        if self.moe_min_tokens < 0:
            raise ValueError(f"moe_min_tokens must be >= 0; got {self.moe_min_tokens}")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1; got {self.max_blocks}")
        self._check_target()

    def _check_target(self) -> None:
        """Normalise target/fallback names; the grid and group size must fit the target."""
        if self.target is None:
            if self.fallback is not None:
                raise ValueError("a fallback type needs a target type")
            return
        object.__setattr__(self, "target", parse_target(self.target))
        QuantSpec(self.bits, self.group_size, self.target)  # grid and group size held?
        if self.fallback is not None:
            object.__setattr__(self, "fallback", parse_target(self.fallback))
        if self.bits_overrides or self.bpw is not None:
            raise ValueError("per-module bit-widths and a bits-per-weight target cannot be "
                             "combined with a GGUF target type")

    def spec_for(self, module_name: str, in_features: int | None = None) -> QuantSpec | None:
        """The spec of a full module name, or None if it is skipped (kept in full precision).

        With a target and `in_features`, a module whose rows are not whole blocks of the target
        gets the fallback type (its default grid and group size, `target.fallback_target`).
        """
        if any(fnmatch.fnmatch(module_name, pat) for pat in self.skip):
            return None
        if self.target is not None:
            return self._target_spec_for(module_name, in_features)
        bits = self.bits
        for pattern, override in self.bits_overrides:
            if fnmatch.fnmatch(module_name, pattern):
                bits = parse_bits(override)
        return QuantSpec(bits, self.group_size, scale_search=self.scale_search)

    def _target_spec_for(self, module_name: str, in_features: int | None) -> QuantSpec:
        if in_features is None:
            return QuantSpec(self.bits, self.group_size, self.target, self.scale_search)
        try:
            qtype = fallback_target(self.target, in_features, self.fallback, module_name)
        except ValueError as err:
            raise GSQError(str(err)) from err
        if qtype == self.target:
            return QuantSpec(self.bits, self.group_size, qtype, self.scale_search)
        return dataclasses.replace(target_spec(qtype), scale_search=self.scale_search)

    def replace(self, **changes) -> QuantizeConfig:
        return dataclasses.replace(self, **changes)

    def targeting(self, target: str, fallback: str | None = None, bits: int | str | None = None,
                  group_size: int | None = None) -> QuantizeConfig:
        """This config optimised for GGUF `target`: bits and group size are the ones the target
        implies (Q2_K: 2-bit g16, ...) unless given; ValueError if they contradict it."""
        tt = target_type(target)
        return self.replace(target=tt.name, fallback=fallback,
                            bits=tt.default_bits if bits is None else bits,
                            group_size=tt.group_size if group_size is None else group_size)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["init_cfg"]["logits_dtype"] = str(self.init_cfg.logits_dtype).replace("torch.", "")
        return out


def _preset(base: QuantizeConfig, e2e: E2EConfig, changes: dict) -> QuantizeConfig:
    """`base` with `changes`; the end-to-end scale stage `e2e` belongs to the GSQ pipeline, so
    the gptq/rtn baselines of a preset stay plain (give `e2e=` to run it after them too)."""
    if changes.get("method", base.method) == "gsq":
        base = base.replace(e2e=e2e)
    return base.replace(**changes)


def cpu_preset(**changes) -> QuantizeConfig:
    """Budget for a small model on a 2-core CPU (SmolLM2-135M: 30 blocks in well under 45 min).

    64 steps per V/O and MLP stage: on SmolLM2 at 2 bit, 32 steps left GSQ behind GPTQ end to end
    (ppl 930 vs 554) while 64 steps beat it (510), see benchmarks/RESULTS.md. The end-to-end
    scale stage makes one pass over 32 of the training windows, 16 steps of 2 windows (about 5
    minutes on 2 cores: a full forward and backward of the model per step).
    """
    train = TrainConfig(epochs=8, batch_size=8, micro_batch_size=4)
    base = QuantizeConfig(nsamples=64, val_samples=8, gptq_samples=32, seqlen=256, train=train,
                          qk_steps=200)
    return _preset(base, E2EConfig(epochs=1, windows=32, batch_size=2, micro_batch_size=2),
                   changes)


def gpu_preset(**changes) -> QuantizeConfig:
    """Budget for one GPU on a small model (minutes for SmolLM2-135M); the end-to-end scale stage
    makes two passes over the 256 training windows, 64 steps of 8 windows."""
    train = TrainConfig(epochs=10, batch_size=32, micro_batch_size=8)
    base = QuantizeConfig(nsamples=256, val_samples=32, gptq_samples=128, seqlen=2048, train=train,
                          qk_steps=1000)
    return _preset(base, E2EConfig(epochs=2, batch_size=8, micro_batch_size=4), changes)


def paper_preset(**changes) -> QuantizeConfig:
    """The paper's recipe (method §6, §9): 4096 x 4096 tokens, batch 64, 20 epochs, g128; the
    scale stage is one epoch over the training windows (method §12), 64 steps of 64 windows."""
    train = TrainConfig(epochs=20, batch_size=64, micro_batch_size=4)
    base = QuantizeConfig(nsamples=4096, val_samples=128, gptq_samples=512, seqlen=4096,
                          train=train, qk_steps=2000)
    return _preset(base, E2EConfig(epochs=1, batch_size=64, micro_batch_size=2), changes)


PRESETS = {"cpu": cpu_preset, "gpu": gpu_preset, "paper": paper_preset}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GSQError(f"device '{device}' requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise GSQError(f"device must be 'cpu' or 'cuda[:N]'; got '{device}'")
    return torch.device(device)
