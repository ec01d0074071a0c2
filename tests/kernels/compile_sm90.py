"""Compile the fused sampler kernels for sm_90 (H100) without a GPU: Triton front end, LLVM and
the ptxas bundled with the triton wheel. Catches what the interpreter cannot (types, constexpr
branches, inline PTX). Run as a script in a process *without* TRITON_INTERPRET (the interpreter
decides at decoration time); prints one line per kernel and exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gsq.kernels import sampler_triton as st  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TYPES = {"logits_ptr": "*fp32", "scale_ptr": "*fp32", "values_ptr": "*fp32", "valid_ptr": "*u8",
         "out_ptr": "*bf16", "gw_ptr": "*bf16", "gl_ptr": "*fp32", "gs_ptr": "*fp32",
         "seed": "i64", "n_rows": "i32", "n_cols": "i32", "n_w": "i32", "group_size": "i32",
         "n_groups": "i32", "kappa": "fp32", "inv_tau": "fp32", "k_over_t": "fp32",
         "seeds_ptr": "*i64"}


def compile_kernel(fn, constexprs: dict, **types) -> None:
    """triton.compile `fn` for sm_90 with the given constexprs (other arguments typed by TYPES)."""
    all_types = dict(TYPES, **types)
    sig = {n: ("constexpr" if n in constexprs else all_types[n]) for n in fn.arg_names}
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=TARGET,
                            options={"num_warps": st.NUM_WARPS})
    assert kernel.asm.get("cubin"), "no cubin"


def cases():
    tile = dict(BLOCK_R=4, BLOCK_C=128, EVEN_C=True, N_CHUNKS=1, FAST_LOG=True, N_ROUNDS=10)
    grid = dict(K=4, HAS_NOISE=True, HAS_VALID=False, PER_WEIGHT=False, WIDE=False, **tile)
    shift = dict(grid, K=5, HAS_VALID=True, PER_WEIGHT=True)
    yield st._categorical_fwd_kernel, grid, {}
    yield st._categorical_bwd_kernel, dict(grid, ACCUM=True, BATCHED=False, N_BATCH=1), {}
    yield st._categorical_bwd_kernel, dict(grid, ACCUM=True, BATCHED=True, N_BATCH=8), {}
    yield st._categorical_bwd_kernel, dict(grid, ACCUM=False, BATCHED=False, N_BATCH=1, WIDE=True,
                                           EVEN_C=False, N_CHUNKS=3), {"n_w": "i64"}
    yield st._categorical_fwd_kernel, shift, {"values_ptr": "*i8"}
    bf16_shift = {"values_ptr": "*i8", "logits_ptr": "*bf16", "gl_ptr": "*bf16"}
    yield st._categorical_bwd_kernel, dict(shift, ACCUM=True, BATCHED=True, N_BATCH=8), bf16_shift
    tern = dict(HAS_NOISE=True, WIDE=False, **tile)
    yield st._ternary_fwd_kernel, tern, {}
    yield st._ternary_bwd_kernel, dict(tern, ACCUM=True, BATCHED=False, N_BATCH=1), {}
    yield st._ternary_bwd_kernel, dict(tern, ACCUM=True, BATCHED=True, N_BATCH=8), {}
    yield st._uniform_kernel, dict(K=5, BLOCK=1024, WIDE=False, N_ROUNDS=10), {"out_ptr": "*fp32"}


API_MISMATCH = 3  # exit code: this triton's compile API differs (the test skips)


def main() -> int:
    try:
        ASTSource(st._uniform_kernel, {"out_ptr": "*fp32"}, constexprs={})
    except TypeError as exc:  # ASTSource's signature changed across triton releases
        print(f"ASTSource API mismatch: {exc}", file=sys.stderr)
        return API_MISMATCH
    for fn, constexprs, types in cases():
        compile_kernel(fn, constexprs, **types)
        print(f"compiled {fn.__name__} {constexprs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
