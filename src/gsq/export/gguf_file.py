"""A complete llama.cpp GGUF file from a gsq quantized directory (spec: formats.md B.1-B.3).

`export_gguf(qdir, out)` writes
  * the architecture keys llama.cpp needs, taken from the HF `config.json` (`gsq.gguf.arch`);
  * the tokenizer: every `tokenizer.*` key copied from the source GGUF when the directory was
    quantized from a `.gguf` file (or the `smollm2-demo` alias), otherwise converted from the
    directory's HF tokenizer, byte-level BPE or SentencePiece BPE (`gsq.export.gguf_tokenizer`);
  * every tensor: the quantized linears as GGUF blocks built from their integer codes and scales
    (`gsq.export.gguf_blocks`, exact unless `lossy`), everything else (embeddings, norms, an untied
    lm_head, linears left in full precision) as plain floats.
llama.cpp expects the rows of `attn_q` / `attn_k` in its interleaved rotary order, so those rows are
permuted; codes and scales are permuted together, which permutes the rows of `s·c` (B.3).

`write_base_gguf(model_source, out)` writes the unquantized base model the same way (the input of
llama.cpp's own quantizer for the baselines). Reading files, the type table and the writer itself
are `gsq.gguf`'s.

Files are written beside `out` under a temporary name and renamed at the end.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gsq.errors import GSQError
from gsq.export.gguf_blocks import default_type, encode_weight, exact_problem
from gsq.export.gguf_tokenizer import (
    check_source_tokenizer,
    tokenizer_kv_from_gguf,
    tokenizer_kv_from_hf,
)
from gsq.gguf import (
    FLOAT_TYPES,
    TYPES,
    HParams,
    KeyValue,
    TensorInfo,
    always_f32,
    extra_tensors,
    file_type,
    model_hparams,
    permute_rows,
    qk_heads,
    row_bytes,
    tensor_slot,
    type_id,
    write_model_file,
)
from gsq.io.quantized_dir import (
    CODES_FILE,
    META_FILE,
    REPORT_FILE,
    atomic_output_file,
    check_output_path,
    is_quantized_dir,
    load_records,
)
from gsq.quant.types import QuantizedWeight

log = logging.getLogger(__name__)

# Block types a tensor gsq did not quantize (embeddings, an untied lm_head) may be converted to
# with `--type PATTERN=TYPE`, rounded by the gguf package's reference quantizers as llama.cpp does
# (lossy by nature, listed in the report's "converted"), e.g. token_embd=Q8_0 as in llama.cpp's
# own Q4_K_M / Q4_0 files.
CONVERTIBLE_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")


def export_types() -> tuple[str, ...]:
    """Every type a gsq tensor can be written in (those `gguf_blocks` encodes)."""
    return tuple(TYPES)


def _check_type(name: str, allowed: tuple[str, ...] | None = None) -> str:
    allowed = allowed or export_types()
    upper = name.strip().upper()
    if upper not in allowed:
        raise GSQError(f"GGUF type must be one of {', '.join(allowed)}; got '{name}'")
    return upper



# --------------------------------------------------------------------------------------------
# Tensors: the q/k permutation of records, the per-tensor plan


def permute_record(qw: QuantizedWeight, n_heads: int) -> QuantizedWeight:
    """The same row permutation applied to codes and scales: rows of s·c are permuted."""
    return QuantizedWeight(permute_rows(qw.codes, n_heads), permute_rows(qw.scale, n_heads),
                           qw.spec)


@dataclass
class PlannedTensor:
    """One GGUF tensor to write: its type and where its values come from: `record` (a quantized
    linear) or `load` (a float tensor), or for a merged expert tensor `ffn_*_exps`
    `[n_expert, out, in]` one part per expert (each with a record or a loader)."""

    gguf_name: str
    hf_name: str  # parameter name, e.g. model.layers.0.mlp.down_proj.weight
    shape: tuple[int, ...]  # numpy order: [out, in], [d] or [n_expert, out, in]
    qtype: str
    record: QuantizedWeight | None = None
    load: Callable[[], torch.Tensor] | None = None
    parts: tuple[PlannedTensor, ...] = ()  # merged experts, in expert order

    @property
    def module(self) -> str:
        return self.hf_name.removesuffix(".weight")

    @property
    def records(self) -> list[QuantizedWeight]:
        """The quantized records it is written from ([] for a float tensor)."""
        if self.parts:
            return [p.record for p in self.parts if p.record is not None]
        return [self.record] if self.record is not None else []

    @property
    def quantized(self) -> bool:
        return bool(self.records)

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return rows * row_bytes(type_id(self.qtype), self.shape[-1])


def _record_type(qw: QuantizedWeight) -> str:
    return qw.spec.target or default_type(qw)


def plan_tensors(float_weights: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]],
                 records: dict[str, QuantizedWeight], hp: HParams, float_type: str,
                 overrides: dict[str, str] | None = None) -> list[PlannedTensor]:
    """Every tensor of the GGUF file, in llama.cpp's order, with its type.

    float_weights: checkpoint name -> (shape, loader) of the checkpoint's tensors; records: the
    quantized linears by module name (their float copies in the checkpoint are not used).
    Quantized linears get the GGUF type they were quantized for (`qw.spec.target`, see
    `gsq quantize --target`) or else `default_type(qw)`, tensors llama.cpp keeps in F32
    (`always_f32`: norms, biases, routers) F32, other tensors `float_type`; an expert's
    projection is its slice of the merged `ffn_*_exps` tensor; tensors without a checkpoint
    counterpart (llama3's rope_freqs) are added. An override (fnmatch pattern -> type, last
    match wins) applies to the module name, the HF name or the GGUF name.
    """
    float_type = _check_type(float_type, FLOAT_TYPES)
    shapes = {name: shape for name, (shape, _) in float_weights.items()}
    shapes.update({f"{m}.weight": tuple(qw.shape) for m, qw in records.items()})
    planned, experts = [], {}
    for hf_name, shape in shapes.items():
        if hp.tied and hf_name == "lm_head.weight" and "lm_head" not in records:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name, expert = tensor_slot(hf_name, hp)
        record = records.get(hf_name.removesuffix(".weight"))
        if record is not None:
            t = PlannedTensor(gguf_name, hf_name, shape, _record_type(record), record)
        else:
            qtype = "F32" if always_f32(gguf_name, shape) else float_type
            t = PlannedTensor(gguf_name, hf_name, shape, qtype, load=float_weights[hf_name][1])
        if expert is None:
            planned.append(t)
        else:
            experts.setdefault(gguf_name, {})[expert] = t
    planned += [_merge_experts(name, parts) for name, parts in experts.items()]
    planned += [PlannedTensor(name, name, value.shape, "F32",
                              load=lambda v=value: torch.from_numpy(v))
                for name, value in extra_tensors(hp).items()]
    _apply_overrides(planned, overrides or {})
    for t in planned:
        try:
            t.nbytes  # noqa: B018 (checks that the rows are whole blocks of the type)
        except GSQError as err:
            raise GSQError(f"'{t.module}' cannot be stored as {t.qtype}: {err}") from None
    return sorted(planned, key=_gguf_order)


def _merge_experts(gguf_name: str, parts: dict[int, PlannedTensor]) -> PlannedTensor:
    """One `ffn_*_exps` tensor from its experts' projections (same shape, and all quantized to
    one type or none quantized); GSQError naming what differs."""
    first = parts[min(parts)]
    if sorted(parts) != list(range(len(parts))):
        missing = sorted(set(range(max(parts) + 1)) - set(parts))
        raise GSQError(f"'{gguf_name}': the checkpoint lacks experts {missing}")
    ordered = tuple(parts[e] for e in range(len(parts)))
    if len({p.shape for p in ordered}) > 1:
        raise GSQError(f"'{gguf_name}': the experts' projections differ in shape")
    quantized = {p.record is not None for p in ordered}
    if len(quantized) > 1:
        raise GSQError(f"'{gguf_name}': some experts of '{first.module}' were quantized and "
                       f"others not; a GGUF expert tensor has one type")
    types = sorted({p.qtype for p in ordered})
    if len(types) > 1:
        raise GSQError(f"'{gguf_name}': the experts of '{first.module}' were quantized to "
                       f"different GGUF types ({', '.join(types)}); a GGUF expert tensor has "
                       f"one type")
    merged = re.sub(r"\.experts\.\d+\.", ".experts.", first.hf_name)
    return PlannedTensor(gguf_name, merged, (len(ordered), *first.shape), types[0],
                         parts=ordered)


def _gguf_order(t: PlannedTensor) -> tuple:
    """token_embd, then blocks by index, then output_norm / output."""
    match = re.match(r"blk\.(\d+)\.", t.gguf_name)
    if match:
        return (1, int(match.group(1)), t.gguf_name)
    return (0 if t.gguf_name.startswith("token_embd") else 2, 0, t.gguf_name)


def _apply_overrides(planned: list[PlannedTensor], overrides: dict[str, str]) -> None:
    """Set each tensor's type from the last matching pattern; GSQError for patterns that match
    nothing and types a tensor cannot take (block types for float tensors, non-F32 norms)."""
    for pattern, qtype in overrides.items():
        qtype = _check_type(qtype)
        hits = [t for t in planned if _matches(pattern, t)]
        if not hits:
            raise GSQError(f"--type pattern '{pattern}' matches no tensor")
        for t in hits:
            if always_f32(t.gguf_name, t.shape) and qtype != "F32":
                what = "1-D (a norm or bias)" if len(t.shape) == 1 else "an expert router"
                raise GSQError(f"'{t.hf_name}' is {what}; it is always stored as F32")
            if not t.quantized and qtype not in FLOAT_TYPES + CONVERTIBLE_TYPES:
                raise GSQError(f"'{t.module}' was not quantized by gsq; it can only be stored as "
                               f"{', '.join(FLOAT_TYPES + CONVERTIBLE_TYPES)}, not {qtype}")
            t.qtype = qtype


def _matches(pattern: str, t: PlannedTensor) -> bool:
    names = (t.module, t.hf_name, t.gguf_name, t.gguf_name.removesuffix(".weight"))
    return any(fnmatch.fnmatchcase(name, pattern) for name in names)


# --------------------------------------------------------------------------------------------
# Encoding


def check_exact(planned: list[PlannedTensor], lossy: bool) -> dict[str, str]:
    """{module: problem} of quantized tensors whose type cannot hold s·c exactly.

    Raises GSQError naming the first one unless `lossy` (then they are rounded and reported).
    """
    problems = {}
    for t in planned:
        for qw in t.records:
            problem = exact_problem(t.qtype, qw)
            if problem:
                problems[t.module] = f"{t.qtype}: {problem}"
                break
    if problems and not lossy:
        first, reason = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""
        raise GSQError(f"cannot store '{first}' exactly as {reason}{more}; choose another --type "
                       f"or pass --lossy to round")
    return problems


def encode_tensor(t: PlannedTensor, hp: HParams, lossy: bool) -> np.ndarray:
    """The bytes (or float array) written for one planned tensor, q/k rows permuted; a merged
    expert tensor is its experts' encodings one after the other (expert-major rows)."""
    heads = qk_heads(t.gguf_name, hp)
    if t.quantized:
        records = [permute_record(qw, heads) if heads else qw for qw in t.records]
        data = np.concatenate([encode_weight(t.qtype, qw, lossy=lossy) for qw in records])
    else:
        weight = torch.stack([p.load() for p in t.parts]) if t.parts else t.load()
        weight = weight.detach().float().cpu()
        data = encode_float(permute_rows(weight, heads) if heads else weight, t.qtype, t.hf_name)
    if data.nbytes != t.nbytes:
        raise GSQError(f"encoded '{t.hf_name}' as {t.qtype} has {data.nbytes} bytes, expected "
                       f"{t.nbytes}")
    return data


def encode_float(weight: torch.Tensor, qtype: str, name: str) -> np.ndarray:
    """fp32 tensor -> F32 / F16 array, or BF16 / a CONVERTIBLE_TYPES block type as uint8 bytes
    [..., row bytes] (the gguf package's reference rounding)."""
    import gguf

    array = weight.numpy().astype(np.float32, copy=False)
    if qtype == "F32":
        return np.ascontiguousarray(array)
    if qtype == "F16":
        half = array.astype(np.float16)
        if not np.isfinite(half).all() and np.isfinite(array).all():
            raise GSQError(f"'{name}' overflows F16; use --float-type F32 or BF16")
        return half
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType[qtype])


# --------------------------------------------------------------------------------------------
# Writing


def write_gguf(out: str | Path, hp: HParams, planned: list[PlannedTensor],
               tokenizer_kv: list[KeyValue], *, name: str, lossy: bool = False,
               overwrite: bool = False) -> dict:
    """Write the GGUF file (each tensor encoded in turn, so only one tensor's bytes are in memory
    at a time). Returns the report of `export_gguf`."""
    infos = [TensorInfo(t.gguf_name, t.shape, t.qtype, t.nbytes) for t in planned]
    with atomic_output_file(out, overwrite) as tmp:
        write_model_file(tmp, hp, infos, (encode_tensor(t, hp, lossy) for t in planned),
                         name=name, file_type=_file_type(planned), keys=tokenizer_kv)
        size = tmp.stat().st_size
    return _report(out, planned, size)


def _file_type(planned: list[PlannedTensor]) -> int:
    """general.file_type: the type holding most quantized bytes (informational only)."""
    weights = Counter()
    for t in planned:
        weights[t.qtype if t.quantized else "F16"] += t.nbytes
    return file_type(weights.most_common(1)[0][0])


def _report(out: str | Path, planned: list[PlannedTensor], size: int) -> dict:
    quantized = [t for t in planned if t.quantized]
    numel = sum(int(np.prod(t.shape)) for t in quantized)
    return {
        "out": str(out),
        "file_bytes": size,
        "tensors": len(planned),
        "tensor_types": dict(sorted(Counter(t.qtype for t in planned).items())),
        "quantized_tensors": len(quantized),
        "quantized_types": dict(sorted(Counter(t.qtype for t in quantized).items())),
        "quantized_bpw": 8 * sum(t.nbytes for t in quantized) / numel if numel else None,
    }


# --------------------------------------------------------------------------------------------
# Entry points


def export_gguf(qdir: str | Path, out: str | Path, *, float_type: str = "F16",
                type_overrides: dict[str, str] | None = None, lossy: bool = False,
                overwrite: bool = False) -> dict:
    """Write a llama.cpp-loadable GGUF of the gsq quantized directory `qdir` to `out`.

    type_overrides: fnmatch pattern (module, HF or GGUF tensor name) -> GGUF type. With `lossy`,
    quantized tensors whose type cannot hold s·c exactly are rounded (listed in the report's
    "inexact"); without it that is a GSQError and nothing is written.
    Returns {"out", "file_bytes", "tensors", "tensor_types", "quantized_tensors",
    "quantized_types", "quantized_bpw", "tokenizer", "inexact", "converted"}; "converted" lists
    the tensors gsq did not quantize that an override stored in a block type (CONVERTIBLE_TYPES).
    """
    qdir = Path(qdir)
    if not is_quantized_dir(qdir):
        raise GSQError(f"'{qdir}' is not a gsq quantized directory (no {META_FILE})")
    check_output_path(out, overwrite)
    hp = model_hparams(_read_config(qdir))
    tokenizer_kv, tokenizer_from = quantized_dir_tokenizer(qdir, hp.n_vocab)  # before the codes
    records = load_records(qdir)
    planned = plan_tensors(_checkpoint_weights(qdir), records, hp, float_type, type_overrides)
    inexact = check_exact(planned, lossy)
    report = write_gguf(out, hp, planned, tokenizer_kv, name=qdir.resolve().name, lossy=lossy,
                        overwrite=overwrite)
    converted = {t.module: t.qtype for t in planned
                 if not t.quantized and t.qtype in CONVERTIBLE_TYPES}
    report.update({"tokenizer": tokenizer_from, "inexact": inexact, "converted": converted})
    log.info("wrote %s: %d tensors %s, %.2f MiB, %.3f bpw in quantized tensors", out,
             report["tensors"], report["tensor_types"], report["file_bytes"] / 2**20,
             report["quantized_bpw"] or float("nan"))
    return report


def write_base_gguf(model_source: str, out: str | Path, float_type: str = "F16",
                    overwrite: bool = False) -> dict:
    """An F32/F16/BF16 GGUF of the unquantized base model (e.g. llama.cpp's quantizer input).

    model_source: anything `gsq quantize` accepts as a base model (.gguf, HF folder or id, the
    demo alias). Returns the report of `export_gguf`.
    """
    from gsq.models.gguf_decoded import checkpoint_tensors
    from gsq.models.loading import load_base_model, resolve_model_source

    check_output_path(out, overwrite)
    resolved = resolve_model_source(model_source)
    if not str(resolved).lower().endswith(".gguf"):
        check_source_tokenizer(str(resolved))  # before the weights load
    model, tokenizer = load_base_model(resolved)
    hp = model_hparams(model.config)
    weights = {k: (tuple(v.shape), (lambda v=v: v.detach()))
               for k, v in checkpoint_tensors(model).items()}  # experts one by one
    planned = plan_tensors(weights, {}, hp, float_type)
    if str(resolved).lower().endswith(".gguf"):
        tokenizer_kv, tokenizer_from = tokenizer_kv_from_gguf(resolved, hp.n_vocab), str(resolved)
    else:
        with tempfile.TemporaryDirectory(prefix="gsq-tok-") as tok_dir:
            tokenizer.save_pretrained(tok_dir)
            tokenizer_kv = tokenizer_kv_from_hf(tok_dir, hp.n_vocab)
        tokenizer_from = "converted from the HF tokenizer"
    report = write_gguf(out, hp, planned, tokenizer_kv, name=Path(str(model_source)).name,
                        overwrite=overwrite)
    report["tokenizer"] = tokenizer_from
    return report


def _read_config(qdir: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(qdir))
    except (OSError, ValueError, KeyError) as err:  # KeyError: incomplete rope parameters
        raise GSQError(f"cannot read the model config of '{qdir}': {err!s}") from err


def _checkpoint_weights(qdir: Path) -> dict[str, tuple[tuple[int, ...], Callable]]:
    """HF parameter name -> (shape, loader) over the directory's model safetensors (lazy)."""
    from safetensors import safe_open

    files = sorted(p for p in qdir.glob("*.safetensors") if p.name != CODES_FILE)
    if not files:
        raise GSQError(f"'{qdir}' has no model safetensors file")
    weights = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = tuple(f.get_slice(key).get_shape())
                weights[key] = (shape, _loader(path, key))
    return weights


def _loader(path: Path, key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(key)
    return load


def model_source_of(qdir: str | Path) -> str | None:
    """The base model a quantized directory was made from (run config or report), if recorded."""
    qdir = Path(qdir)
    for name, keys in ((META_FILE, ("config", "model")), (REPORT_FILE, ("model",))):
        try:
            value: Any = json.loads((qdir / name).read_text())
        except (OSError, ValueError):
            continue
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str):
            return value
    return None


def quantized_dir_tokenizer(qdir: Path, n_vocab: int) -> tuple[list[KeyValue], str]:
    """Tokenizer keys for a quantized directory and where they came from: copied from the source
    GGUF if the run started from one that still exists, else converted from the HF files."""
    from gsq.models.loading import DEMO_MODEL, resolve_model_source

    source = model_source_of(qdir)
    if source is not None and (source == DEMO_MODEL or source.lower().endswith(".gguf")):
        try:
            path = resolve_model_source(source)
        except GSQError as err:
            log.warning("cannot find the source model %s (%s)", source, err)
            path = None
        if path is not None and Path(path).is_file():
            return tokenizer_kv_from_gguf(path, n_vocab), str(path)
        log.warning("source GGUF %s not found; converting the HF tokenizer instead", source)
    return tokenizer_kv_from_hf(qdir, n_vocab), "converted from the HF tokenizer"
