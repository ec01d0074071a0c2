"""The demo: SmolLM2-135M-Instruct quantized with RTN, GPTQ and GSQ on the CPU, side by side.

Every row uses the same model, calibration (the bundled mix), group size and seed, and is
evaluated on the same text against the full-precision model (perplexity, KL, top-1 agreement).
The table (`demo.md`, `demo.json`) and a plot of perplexity and KL against bits per parameter
(`demo.png`, with matplotlib) go to the output folder.

Two budgets:
  * "quick" (default): 2 and 3 bit on the first 4 of the 30 blocks (the others stay in full
    precision), a small calibration and training budget, no end-to-end scale stage, evaluated on
    2,048 tokens; under 10 minutes on a 2-core CPU. The models are quantized in memory. A smoke
    test of the pipeline: at this budget GSQ has few steps to move from its GPTQ start.
  * "full": the `cpu` preset (`gsq.config.cpu_preset`) at 2 bit on all blocks, 16,384 tokens,
    each model written to the output folder; about an hour on a 2-core CPU, most of it in GSQ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gsq.config import QuantizeConfig, cpu_preset
from gsq.errors import GSQError
from gsq.quant.trainer import TrainConfig

log = logging.getLogger(__name__)

DEMO_SOURCE = "smollm2-demo"
METHODS = ("rtn", "gptq", "gsq")


def quick_preset(**changes) -> QuantizeConfig:
    """The quick demo's budget: the cpu preset cut to minutes for SmolLM2-135M on 2 cores (16
    train, 4 val and 16 GPTQ windows of 128 tokens; 4 epochs of 2 Lion steps per V/O and MLP
    stage; 50 Q/K steps; no end-to-end scale stage)."""
    base = cpu_preset(nsamples=16, val_samples=4, gptq_samples=16, seqlen=128, qk_steps=50,
                      train=TrainConfig(epochs=4, batch_size=8, micro_batch_size=8))
    return base.replace(e2e=dataclasses.replace(base.e2e, epochs=0), **changes)


@dataclass(frozen=True)
class Budget:
    """One demo budget: its configs, default bit widths and evaluation, and the estimated
    seconds of each step on an idle 2-core CPU (from per-block CPU times; they only weigh the
    steps for the ETA, which scales them by the measured pace)."""

    preset: Callable[..., QuantizeConfig]
    bits: tuple
    max_blocks: int | None  # None: every block
    max_tokens: int
    seqlen: int
    seconds: dict[str, float]
    in_memory: bool  # quantize in memory (`quantize_model`) instead of writing directories


BUDGETS = {
    "quick": Budget(quick_preset, (2, 3), 4, 2048, 512,
                    {"load": 40, "eval": 20, "rtn": 20, "gptq": 30, "gsq": 75}, True),
    "full": Budget(cpu_preset, (2,), None, 16384, 2048,
                   {"load": 40, "eval": 150, "rtn": 120, "gptq": 270, "gsq": 2150}, False),
}


def format_table(rows: list[dict]) -> str:
    """Markdown table of result rows (keys: name, ppl, kl, top1, bpp, seconds, peak_gib)."""
    head = "| model | ppl | KL vs base | top-1 | bpp | quantize s | peak RAM GiB |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        def fmt(key, spec, r=r):
            value = r.get(key)
            return "-" if value is None else format(value, spec)
        lines.append(f"| {r['name']} | {fmt('ppl', '.3f')} | {fmt('kl', '.4f')} | "
                     f"{fmt('top1', '.4f')} | {fmt('bpp', '.3f')} | {fmt('seconds', '.0f')} | "
                     f"{fmt('peak_gib', '.2f')} |")
    return "\n".join(lines)


def write_plot(rows: list[dict], path: Path) -> bool:
    """Perplexity (log scale) and KL vs bits per parameter, one line per method, the base model's
    perplexity dashed; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_ppl, ax_kl) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for method in METHODS:
        points = sorted((r["bpp"], r["ppl"], r["kl"]) for r in rows if r.get("method") == method)
        if points:
            bpp, ppl, kl = zip(*points, strict=True)
            ax_ppl.plot(bpp, ppl, marker="o", label=method.upper())
            ax_kl.plot(bpp, kl, marker="o", label=method.upper())
    base = [r["ppl"] for r in rows if r.get("method") == "base"]
    if base:
        ax_ppl.axhline(base[0], color="gray", linestyle="--", label="base (fp32)")
    ax_ppl.set(yscale="log", xlabel="bits per parameter", ylabel="perplexity",
               title="perplexity (lower is better)")
    ax_kl.set(xlabel="bits per parameter", ylabel="KL(base || model), nats per token",
              title="KL vs base (lower is better)")
    for ax in (ax_ppl, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M-Instruct, gsq demo")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _progress_bar(total: float, enabled: bool):
    """The demo's overall bar: estimated seconds of work done, elapsed time and ETA."""
    from tqdm.auto import tqdm

    return tqdm(total=round(total), desc="demo", unit="s", disable=not enabled, position=0,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed} elapsed, ETA {remaining}]")


def run_demo(bits=None, group_size: int = 64, text: str | None = None, budget: str = "quick",
             max_tokens: int | None = None, max_blocks: int | None = None,
             out_dir: str = "runs/demo", device: str = "cpu", progress: bool = True,
             seqlen: int | None = None) -> list[dict]:
    """Quantize the demo model with each method at each bit width of `bits` (default: the
    budget's) on the budget's blocks (or the first `max_blocks`), evaluate every result against
    the base model on `text`; print the table as it grows, write demo.md, demo.json and demo.png
    to `out_dir`. Returns the rows."""
    from gsq.api import load_any_model

    if budget not in BUDGETS:
        raise GSQError(f"demo budget must be one of {', '.join(BUDGETS)}; got '{budget}'")
    plan = BUDGETS[budget]
    widths = plan.bits if bits is None else tuple(bits) if isinstance(bits, (list, tuple)) \
        else (bits,)
    max_blocks = max_blocks or plan.max_blocks
    cost = plan.seconds
    total = cost["load"] + cost["eval"] + len(widths) * sum(cost[m] + cost["eval"]
                                                           for m in METHODS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"seqlen": seqlen or plan.seqlen, "max_tokens": max_tokens or plan.max_tokens,
          "device": device, "progress": False}
    with _progress_bar(total, progress) as bar:
        run = _DemoRun(plan, *load_any_model(DEMO_SOURCE), text, kw, out, progress)
        rows = [run.base_row()]
        bar.update(cost["load"] + cost["eval"])
        for width in widths:
            for method in METHODS:
                cfg = plan.preset(method=method, bits=width, group_size=group_size,
                                  max_blocks=max_blocks)
                rows.append(run.row(cfg))
                bar.update(cost[method] + cost["eval"])
                bar.write(format_table(rows))
    _write_outputs(rows, out, budget, {**kw, "max_blocks": max_blocks})
    return rows


class _DemoRun:
    """The base model, its tokenizer, the evaluation tokens and (in memory) the calibration
    tokens, shared by the rows."""

    def __init__(self, plan: Budget, base_model, tokenizer, text, kw: dict, out: Path,
                 progress: bool) -> None:
        from gsq.api import calibration_tokens
        from gsq.data.calibration import read_text, tokenize_text

        self.plan, self.base, self.tokenizer, self.kw = plan, base_model, tokenizer, kw
        self.out, self.progress = out, progress
        self.tokens = tokenize_text(tokenizer, read_text(text))
        self.calib = calibration_tokens(tokenizer, None) if plan.in_memory else None

    def base_row(self) -> dict:
        from gsq.api import evaluate

        base = evaluate(self.base, self.tokens, **self.kw)
        return {"name": "base (fp32)", "method": "base", "ppl": base["ppl"], "kl": 0.0,
                "top1": 1.0, "bpp": 32.0}

    def row(self, cfg: QuantizeConfig) -> dict:
        """Quantize with `cfg`, evaluate against the base model: one table row."""
        import copy

        import torch

        from gsq.api import evaluate, quantize, quantize_model

        device = torch.device(self.kw["device"])
        if self.plan.in_memory:
            model = copy.deepcopy(self.base)
            _, report = quantize_model(model, self.tokenizer, cfg, self.calib, device,
                                       self.progress)
        else:
            result = quantize(DEMO_SOURCE, cfg, progress=self.progress, overwrite=True,
                              out=self.out / f"{cfg.method}-{cfg.bits}bit-g{cfg.group_size}",
                              device=self.kw["device"])
            model, report = result.model, result.report
        metrics = evaluate(model, self.tokens, base=self.base, **self.kw)
        blocks = "" if cfg.max_blocks is None else f", blocks 0-{cfg.max_blocks - 1}"
        return {"name": f"{cfg.method.upper()} {cfg.bits}-bit g{cfg.group_size}{blocks}",
                "method": cfg.method, "bits": cfg.bits, **metrics, "bpp": report["bpp"],
                "seconds": report["quantize_seconds"],
                "peak_gib": report.get("peak_host_rss_gib")}


def _write_outputs(rows: list[dict], out: Path, budget: str, kw: dict) -> None:
    table = format_table(rows)
    (out / "demo.md").write_text(table + "\n", encoding="utf-8")
    meta = {k: kw[k] for k in ("seqlen", "max_tokens", "max_blocks")}
    (out / "demo.json").write_text(json.dumps({"budget": budget, **meta, "rows": rows},
                                              indent=1), encoding="utf-8")
    plotted = write_plot(rows, out / "demo.png")
    print(table)
    print(f"table: {out / 'demo.md'}, plot: "
          + (str(out / "demo.png") if plotted else "not written (matplotlib is not installed)"))
