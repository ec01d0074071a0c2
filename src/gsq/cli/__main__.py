"""`gsq quantize | eval | demo`: argument parsing that builds configs and calls the library.

Every user-input problem ends as one line `gsq: error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from gsq.errors import GSQError

log = logging.getLogger("gsq")


def _bits(value: str):
    from gsq.quant.types import parse_bits

    try:
        return parse_bits(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _target(value: str) -> str:
    from gsq.quant.target import parse_target

    try:
        return parse_target(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return number


def _override(value: str) -> tuple[str, str]:
    pattern, sep, bits = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected PATTERN=BITS; got {value!r}")
    _bits(bits)
    return pattern, bits


def _offload_choice(args) -> bool | None:
    if args.offload_activations and args.keep_activations_on_device:
        raise GSQError("--offload-activations and --keep-activations-on-device exclude each other")
    if args.offload_activations:
        return True
    return False if args.keep_activations_on_device else None


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face id or directory, a .gguf file, or 'smollm2-demo'")
    p.add_argument("--method", choices=("gsq", "gptq", "rtn"), default="gsq")
    p.add_argument("--bits", type=_bits, default=None,
                   help="2, 3, 4 or ternary (default 2, or the one --target implies)")
    p.add_argument("--group-size", type=_positive, default=None,
                   help="columns per scale (default 128, or the one --target implies)")
    p.add_argument("--target", type=_target, default=None, metavar="gguf:TYPE",
                   help="optimise under a GGUF type's own constraints (code grid, scale unit, "
                        "scale lattice) so `gsq export --format gguf` writes exactly the evaluated "
                        "model: Q2_K (2-bit g16), Q3_K (3-bit g16), Q4_K (4-bit g32), Q4_0 (4-bit "
                        "g32), Q2_0 (2-bit g64), TQ2_0 / TQ1_0 (ternary g256)")
    p.add_argument("--fallback", type=_target, default=None, metavar="gguf:TYPE",
                   help="with --target: type of tensors whose rows are not whole blocks of it "
                        "(K/TQ types need widths divisible by 256; default Q4_0, as llama.cpp)")
    p.add_argument("--export-format", action="append", default=[],
                   choices=("gguf", "compressed-tensors"), metavar="FORMAT",
                   help="gguf or compressed-tensors: a format the result will be exported in; "
                        "the model's architecture is checked for it before any work (--target "
                        "implies gguf)")
    _add_budget_args(p)
    p.add_argument("--chat-template", action="store_true",
                   help="render the calibration text as conversations in the tokenizer's chat "
                        "template (instruct models)")
    p.add_argument("--e2e-epochs", type=int, default=None,
                   help="end-to-end scale stage after the block loop: passes over the training "
                        "windows training every group scale on KL(full precision || quantized), "
                        "codes frozen, kept only if the held-out KL improves (default: the "
                        "preset's for gsq, 0 = off for the gptq/rtn baselines)")
    p.add_argument("--e2e-lr", type=float, default=None,
                   help="e2e stage Lion lr, relative: each step moves a scale by lr x its value")
    p.add_argument("--e2e-norms", action="store_true",
                   help="e2e stage: train the RMSNorm weights too")
    p.add_argument("--e2e-streamed", choices=("auto", "on", "off"), default="auto",
                   help="e2e stage: stream the model one block at a time (on; same results, "
                        "memory of one block plus one step's activations) or hold it whole in "
                        "memory (off); auto streams when the whole model in fp32 would exceed "
                        "--max-host-memory (or, on a GPU, half of its free memory)")
    p.add_argument("--scope", choices=("all", "mlp-only"), default="all")
    p.add_argument("--init", choices=("gptq", "rtn"), default="gptq")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ (the gptq method and GSQ's gptq init): solve the columns in order "
                        "of decreasing Hessian diagonal; groups and scales stay those of the "
                        "original column order (scales searched before the solve)")
    p.add_argument("--scale-search", choices=("mse", "absmax"), default="mse",
                   help="RTN/GPTQ group scales: 'mse' searches 80 shrinks of max|x| for the least "
                        "error (default); 'absmax' takes max|x| itself, 80x less work for very "
                        "large models on a CPU, at some accuracy")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="keep modules matching this fnmatch pattern in full precision")
    p.add_argument("--bits-override", action="append", default=[], type=_override,
                   metavar="PATTERN=BITS", help="per-module bit-width")
    p.add_argument("--bpw", type=float, default=None, metavar="X",
                   help="average bits per parameter of the quantized linears (codes and scales, "
                        "e.g. 2.5 or 3.25): 2/3/4-bit widths allocated by measured sensitivity, "
                        "never above X; the allocation is in report.json")
    p.add_argument("--moe-min-tokens", type=int, default=None, metavar="N",
                   help="MoE: an expert routed fewer calibration tokens gets GPTQ Hessians over "
                        "all tokens of its layer (GPTQ split) and keeps its initial codes instead "
                        "of GSQ training (train split); listed in report.json (default 64)")
    p.add_argument("--offload-activations", action="store_true",
                   help="always keep calibration activations on the host between blocks (default: "
                        "on the device when they fit in half of its free memory)")
    p.add_argument("--keep-activations-on-device", action="store_true",
                   help="keep calibration activations on the GPU between blocks (faster, uses "
                        "more GPU memory)")
    p.add_argument("--max-host-memory", type=_gib, default=None, metavar="GIB",
                   help="host memory budget in GiB: calibration activations go to memory-mapped "
                        "files in OUT.partial/ when the planned peak would exceed it (default: "
                        "3/4 of the machine's or the container's memory)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True,
                   help="output directory (built in OUT.partial/, renamed to OUT at the end)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (and discard a partial run)")
    p.add_argument("--resume", action="store_true",
                   help="continue the partial run OUT.partial/ that a killed or interrupted run "
                        "left (refused if the config, model or calibration text changed); "
                        "starts from block 0 if there is none")


def _gib(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB; got {value}")
    return number


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    """The calibration data, budget and schedule, shared by `quantize` and `refine`."""
    p.add_argument("--preset", choices=("cpu", "gpu", "paper"), default="cpu",
                   help="budget defaults that the flags below override (default: cpu)")
    p.add_argument("--calib", default=None, metavar="SOURCE[:WEIGHT],...",
                   help="calibration sources with their shares of the windows, e.g. "
                        "'fiction:0.3,code:0.2,notes.txt:0.5'; a source is a part of the bundled "
                        "mix (fiction, encyclopedic, technical, code, dialogue, book), a text file "
                        "or folder, or a dataset (fineweb-edu, c4, wikitext); weights are "
                        "normalised, none = equal shares (default: 'mix', all five kinds of "
                        "the bundled mix)")
    p.add_argument("--nsamples", type=_positive, help="training sequences")
    p.add_argument("--val-samples", type=_positive,
                   help="held-out calibration sequences (best-epoch choice)")
    p.add_argument("--gptq-samples", type=_positive, help="sequences for GPTQ / Q/K Hessians")
    p.add_argument("--seqlen", type=_positive, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=_positive, help="sequences per optimiser step")
    p.add_argument("--micro-batch-size", type=_positive, help="sequences per forward (fresh noise)")
    p.add_argument("--epochs", type=int, help="epochs per stage")
    p.add_argument("--qk-steps", type=int, help="steps of the Q/K quadratic stage")
    p.add_argument("--logit-lr", type=float)
    p.add_argument("--autocast", choices=("bf16", "fp16"),
                   help="16-bit matmuls in the stage forward/backward (torch.autocast); losses, "
                        "logits and scales stay fp32")
    p.add_argument("--scale-lr", type=float)
    p.add_argument("--logit-travel", type=float,
                   help="budget-aware logit lr: raise lr so a logit can move this far (0 = off)")
    p.add_argument("--no-keep-best", action="store_true",
                   help="keep the last epoch even if the held-out loss rose (reference behaviour)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--max-blocks", type=_positive, help="only the first N blocks")


def _budget(args: argparse.Namespace, **preset_args):
    """(preset config, its TrainConfig changed by the flags, QuantizeConfig changes) of the
    budget flags (`_add_budget_args`)."""
    import dataclasses

    from gsq.config import PRESETS

    base = PRESETS[args.preset](**preset_args)
    train_changes = {k: v for k, v in {
        "epochs": args.epochs, "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size, "logit_lr": args.logit_lr,
        "scale_lr": args.scale_lr, "autocast": args.autocast}.items() if v is not None}
    if args.logit_travel is not None:
        train_changes["logit_travel"] = args.logit_travel or None
    if args.no_keep_best:
        train_changes["keep_best"] = False
    changes = {k: v for k, v in {
        "nsamples": args.nsamples, "val_samples": args.val_samples,
        "gptq_samples": args.gptq_samples, "seqlen": args.seqlen, "qk_steps": args.qk_steps,
        "max_blocks": args.max_blocks}.items() if v is not None}
    return base, dataclasses.replace(base.train, **train_changes), {"seed": args.seed, **changes}


def build_config(args: argparse.Namespace):
    """QuantizeConfig from the preset plus the flags given."""
    try:
        base, train, changes = _budget(args, method=args.method)
        if args.moe_min_tokens is not None:
            changes["moe_min_tokens"] = args.moe_min_tokens
        if args.bpw is not None:
            changes["bpw"] = args.bpw
        cfg = base.replace(
            method=args.method, bits=2 if args.bits is None else args.bits,
            group_size=args.group_size or 128, init=args.init, act_order=args.act_order,
            scale_search=args.scale_search,
            scope=args.scope, skip=tuple(args.skip), bits_overrides=tuple(args.bits_override),
            offload_activations=_offload_choice(args), train=train,
            e2e=_e2e_config(base, args), **changes)
        return _with_target(cfg, args)
    except ValueError as err:
        raise GSQError(str(err)) from err


def _e2e_config(base, args: argparse.Namespace):
    """The preset's e2e stage with the --e2e-* flags applied."""
    import dataclasses

    changes = {k: v for k, v in {"epochs": args.e2e_epochs, "lr": args.e2e_lr}.items()
               if v is not None}
    if args.e2e_norms:
        changes["norms"] = True
    e2e = dataclasses.replace(base.e2e, **changes)
    if (args.e2e_lr is not None or args.e2e_norms) and e2e.epochs == 0:
        raise GSQError("--e2e-lr / --e2e-norms need the e2e stage on (--e2e-epochs N)")
    return e2e


def _with_target(cfg, args: argparse.Namespace):
    """`--target` implies bits and group size unless they are given (then they must fit it)."""
    if args.target is None:
        if args.fallback is not None:
            raise GSQError("--fallback needs --target")
        return cfg
    if args.bits_override or args.bpw is not None:
        raise GSQError("--bits-override and --bpw cannot be combined with --target")
    return cfg.targeting(args.target, args.fallback, args.bits, args.group_size)


def cmd_quantize(args: argparse.Namespace) -> int:
    from gsq.api import quantize
    from gsq.dist import launch_world
    from gsq.quant.types import QuantSpec

    cfg = build_config(args)
    result = quantize(args.model, cfg, calib=args.calib, out=args.out, device=args.device,
                      progress=not args.quiet, overwrite=args.overwrite,
                      export_formats=tuple(args.export_format),
                      chat_template=args.chat_template, resume=args.resume,
                      max_host_memory=args.max_host_memory, e2e_streamed=args.e2e_streamed)
    if not launch_world().is_main:  # under torchrun, rank 0 speaks for the run
        return 0
    r = result.report
    spec = QuantSpec(cfg.bits, cfg.group_size, cfg.target)
    print(f"quantized {r['quantized_tensors']} tensors of "
          f"{r['blocks_quantized']}/{r['blocks_total']} "
          f"blocks with {cfg.method} {spec.label}: {r['bpp']:.3f} bpp, "
          f"{r['wall_seconds']:.1f} s -> {args.out}")
    if r.get("fallback"):
        print(_fallback_line(cfg.target, r["target_types"], r["fallback"]))
    if r.get("moe"):
        print(_moe_line(r["moe"]))
    return 0


def _moe_line(moe: dict) -> str:
    """One line on the MoE experts that had too few calibration tokens."""
    parts = [f"{len(moe[key])} {what}" for key, what in (
        ("pooled_hessian", "with GPTQ Hessians over all tokens of their layer"),
        ("kept_init", "kept their initial codes (no GSQ training)")) if moe[key]]
    starved = "; ".join(parts) if parts else "none"
    return (f"MoE: {moe['experts']} experts; routed fewer than {moe['min_tokens']} calibration "
            f"tokens: {starved} (per-expert token counts in report.json)")


def cmd_plan(args: argparse.Namespace) -> int:
    from gsq.plan import format_plan, plan_source

    cfg = build_config(args)
    result = plan_source(args.model, cfg, device=args.device,
                         host_budget_gib=args.max_host_memory, e2e_streamed=args.e2e_streamed)
    print(format_plan(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _fallback_line(target: str, types: dict[str, int], fallback: dict[str, str]) -> str:
    """One line on the GGUF types of a --target run and the tensors that fell back."""
    names = sorted(fallback)
    shown = ", ".join(names[:4]) + (", ... (all in report.json)" if len(names) > 4 else "")
    counts = ", ".join(f"{n} {t}" for t, n in types.items())
    return (f"GGUF types: {counts}; {len(names)} tensors whose rows are not whole {target} "
            f"blocks use the fallback {'/'.join(sorted(set(fallback.values())))}: {shown}")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a gsq quantized directory or any model gsq quantize accepts")
    p.add_argument("--text", required=True, help="evaluation text file (e.g. WikiText-2 test)")
    p.add_argument("--seqlen", type=_positive, default=2048)
    p.add_argument("--max-tokens", type=_positive, default=None)
    p.add_argument("--base", default=None, help="base model for KL divergence and top-1 agreement")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("--engine", choices=("auto", "transformers", "llama.cpp"), default="auto",
                   help="who runs a .gguf model: transformers (dequantized to fp32; types its "
                        "GGUF reader lacks, e.g. Q2_0, decoded by gsq) or llama.cpp "
                        "(llama-cpp-python, CPU; a .gguf --base runs there too). "
                        "auto: transformers")
    p.add_argument("--tokenizer", default=None,
                   help="llama.cpp engine: tokenize the text with this model's HF tokenizer "
                        "(default: the one transformers builds from the .gguf file)")
    p.add_argument("--numerics", choices=("exact", "llama.cpp"), default="exact",
                   help="transformers engine, .gguf model: 'llama.cpp' rounds activations and "
                        "attention as llama.cpp's CPU backend does (8-bit activations per the "
                        "weight type, fp16 KV cache), to predict llama.cpp's perplexity and "
                        "tell its rounding apart from an export error. Default: exact fp32")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="transformers engine: load the model (and --base) in this dtype; "
                        "bfloat16 takes half the memory of the exact fp32 default")


def cmd_eval(args: argparse.Namespace) -> int:
    from gsq.eval import evaluate

    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise GSQError(f"folder of --json '{args.json}' does not exist")
    result = evaluate(args.model, args.text, tokenizer=args.tokenizer, base=args.base,
                      seqlen=args.seqlen, max_tokens=args.max_tokens, device=args.device,
                      progress=not args.quiet, engine=args.engine, numerics=args.numerics,
                      dtype=args.dtype)
    line = json.dumps(result)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


def _type_override(value: str) -> tuple[str, str]:
    pattern, sep, qtype = value.partition("=")
    if not sep or not pattern.strip() or not qtype.strip():
        raise argparse.ArgumentTypeError(f"expected MODULE_PATTERN=TYPE; got {value!r}")
    return pattern.strip(), qtype.strip().upper()


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("qdir", metavar="QUANTIZED_DIR", help="a gsq quantized directory")
    p.add_argument("--format", required=True, choices=("gguf", "compressed-tensors"))
    p.add_argument("--out", required=True,
                   help="output .gguf file or compressed-tensors directory (written atomically)")
    p.add_argument("--type", action="append", default=[], type=_type_override,
                   metavar="MODULE_PATTERN=TYPE",
                   help="gguf: store the matching tensors (fnmatch on module, HF or GGUF names; "
                        "last match wins) as TYPE, e.g. '*.mlp.down_proj=Q4_0'. Default: the "
                        "smallest type that holds each quantized tensor exactly")
    p.add_argument("--float-type", choices=("F16", "F32", "BF16"), default=None,
                   help="gguf: type of the tensors gsq did not quantize (default F16; norms are "
                        "always F32)")
    p.add_argument("--lossy", action="store_true",
                   help="gguf: round tensors that a --type cannot hold exactly instead of failing")
    p.add_argument("--container-bits", type=int, default=None, metavar="BITS",
                   help="compressed-tensors: store the codes in 4- or 8-bit containers")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        if args.container_bits is not None:
            raise GSQError("--container-bits applies to --format compressed-tensors only")
        from gsq.api import export

        r = export(args.qdir, args.out, "gguf", float_type=args.float_type or "F16",
                   type_overrides=dict(args.type), lossy=args.lossy, overwrite=args.overwrite)
        types = ", ".join(f"{n} {t}" for t, n in r["tensor_types"].items())
        bpw = f"{r['quantized_bpw']:.3f}" if r["quantized_bpw"] is not None else "-"
        inexact = f", {len(r['inexact'])} rounded (--lossy)" if r["inexact"] else ""
        print(f"exported {r['tensors']} tensors ({types}{inexact}), {bpw} bpw in quantized "
              f"tensors, {r['file_bytes'] / 2**20:.1f} MiB -> {args.out}")
        return 0
    gguf_only = [flag for flag, used in (("--type", args.type), ("--float-type", args.float_type),
                                         ("--lossy", args.lossy)) if used]
    if gguf_only:
        raise GSQError(f"{', '.join(gguf_only)}: for --format gguf only")
    from gsq.api import export

    export(args.qdir, args.out, "compressed-tensors", container_bits=args.container_bits,
           overwrite=args.overwrite)
    print(f"exported {args.qdir} as compressed-tensors -> {args.out}")
    return 0


def _add_refine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("gguf", metavar="QUANTIZED.gguf", help="a llama.cpp GGUF file (llama)")
    p.add_argument("--base", required=True,
                   help="its full-precision model: HF id or folder, a .gguf, or 'smollm2-demo'")
    p.add_argument("--out", required=True, help="refined .gguf (same size and tensor types; "
                                                "written atomically, report in OUT.refine.json)")
    _add_budget_args(p)
    p.add_argument("--scales", choices=("frozen", "train"), default="frozen",
                   help="frozen: only codes change (default); train: Q2_K sub-block scales are "
                        "trained too and re-encoded on their 4-bit lattice")
    p.add_argument("--heldout-samples", type=int, default=None,
                   help="extra windows to compare block outputs of the input and the refined "
                        "file with the base (default: --val-samples; 0 = skip)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def build_refine_config(args: argparse.Namespace):
    """QuantizeConfig (budget and schedule) of `gsq refine` from the preset plus the flags."""
    try:
        base, train, changes = _budget(args)
        return base.replace(train=train, **changes)
    except ValueError as err:
        raise GSQError(str(err)) from err


def cmd_refine(args: argparse.Namespace) -> int:
    from gsq.api import refine
    from gsq.refine import report_path

    r = refine(args.gguf, args.base, args.out, cfg=build_refine_config(args), calib=args.calib,
               scales=args.scales, device=args.device, progress=not args.quiet,
               overwrite=args.overwrite, heldout_samples=args.heldout_samples).report
    types = ", ".join(f"{n} {t}" for t, n in r["refined_types"].items()) or "none"
    kept = ", ".join(f"{n} {t}" for t, n in r["passthrough_types"].items()) or "none"
    errors = "; ".join(f"block {h['block']} {h['file_rel_mse']:.4g} -> {h['refined_rel_mse']:.4g}"
                       for h in r["heldout"])
    print(f"refined {len(r['refined'])} tensors ({types}) of {r['blocks_refined']}/"
          f"{r['blocks_total']} blocks: {100 * r['changed_fraction']:.2f}% of codes changed, "
          f"{len(r['tensors_patched'])} tensors rewritten; passed through {kept}")
    if errors:
        print(f"held-out block output rel. MSE vs base, input -> refined: {errors}")
    print(f"{r['file_bytes']} bytes, same tensors and types as the input -> {args.out} "
          f"(report {report_path(args.out)})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gsq.demo import run_demo

    run_demo(bits=args.bits, group_size=args.group_size, text=args.text, budget=args.budget,
             max_tokens=args.max_tokens, max_blocks=args.max_blocks, out_dir=args.out_dir,
             device=args.device, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsq", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    quantize = sub.add_parser("quantize", help="quantize a model")
    _add_quantize_args(quantize)
    _add_output_args(quantize)
    plan = sub.add_parser("plan", help="predict the memory, disk and time a quantize run needs "
                                       "(from the model's config; no weights read)")
    _add_quantize_args(plan)
    plan.add_argument("--json", default=None, help="write the plan as JSON here")
    _add_eval_args(sub.add_parser("eval", help="perplexity, KL and top-1 agreement"))
    _add_export_args(sub.add_parser("export", help="write a quantized directory as GGUF "
                                                   "(llama.cpp) or compressed-tensors"))
    _add_refine_args(sub.add_parser("refine", help="refine the codes of a llama.cpp GGUF file "
                                                   "with GSQ, same types and size"))
    demo = sub.add_parser("demo", help="quantize SmolLM2-135M with RTN, GPTQ and GSQ; a table "
                                       "and a plot (ppl, KL vs bits per parameter)")
    demo.add_argument("--budget", choices=("quick", "full"), default="quick",
                      help="quick: 2 and 3 bit at a small budget, under 10 minutes on 2 CPU "
                           "cores; full: the cpu preset at 2 bit, about an hour")
    demo.add_argument("--bits", type=_bits, nargs="+", default=None,
                      help="bit widths (default: the budget's)")
    demo.add_argument("--group-size", type=_positive, default=64)
    demo.add_argument("--text", required=True, help="evaluation text (e.g. WikiText-2 test)")
    demo.add_argument("--max-tokens", type=_positive, default=None,
                      help="evaluation tokens (default: quick 4096, full 16384)")
    demo.add_argument("--max-blocks", type=_positive, default=None)
    demo.add_argument("--out-dir", default="runs/demo")
    demo.add_argument("--device", default="cpu")
    return parser


@contextlib.contextmanager
def _interrupt_on_sigterm():
    """While a command runs, SIGTERM (a job scheduler, `kill`) unwinds like Ctrl-C, so temporary
    outputs are removed; the previous handler comes back afterwards."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (called from a library): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    if args.quiet:
        import transformers

        os.environ["TQDM_DISABLE"] = "1"  # also bars that bypass transformers' switch (GGUF load)
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    handlers = {"quantize": cmd_quantize, "plan": cmd_plan, "eval": cmd_eval, "export": cmd_export,
                "demo": cmd_demo, "refine": cmd_refine}
    try:
        with _interrupt_on_sigterm():
            return handlers[args.command](args)
    except GSQError as err:
        print(f"gsq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gsq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
