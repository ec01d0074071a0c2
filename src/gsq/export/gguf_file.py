"""A complete llama.cpp GGUF file from a gsq quantized directory (spec: formats.md B.1-B.3).

`export_gguf(qdir, out)` writes
  * the architecture keys a llama.cpp `llama` model needs, taken from the HF `config.json`;
  * the tokenizer: every `tokenizer.*` key copied from the source GGUF when the directory was
    quantized from a `.gguf` file (or the `smollm2-demo` alias), otherwise converted from the
    directory's HF `tokenizer.json` (byte-level BPE of the GPT-2 / SmolLM / Llama-3 kind only);
  * every tensor: the quantized linears as GGUF blocks built from their integer codes and scales
    (`gsq.export.gguf_blocks`, exact unless `lossy`), everything else (embeddings, norms, an untied
    lm_head, linears left in full precision) as plain floats.
llama.cpp expects the rows of `attn_q` / `attn_k` in its interleaved rotary order, so those rows are
permuted; codes and scales are permuted together, which permutes the rows of `s·c` (B.3).

`write_base_gguf(model_source, out)` writes the unquantized base model the same way (the input of
llama.cpp's own quantizer for the baselines). `read_gguf(path)` reads any GGUF's metadata and raw
tensor bytes, including the Q2_0 type that the `gguf` package does not know; `decode_tensor`,
`rotary_rows` and `match_tensors` turn them back into HF parameters (`gsq refine`,
`gsq.models.gguf_decoded`), and `metadata_only_gguf` hands transformers the keys alone.

Files are written beside `out` under a temporary name and renamed at the end.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gsq.errors import GSQError
from gsq.io.quantized_dir import (
    CODES_FILE,
    META_FILE,
    REPORT_FILE,
    check_output_path,
    is_quantized_dir,
    load_records,
)
from gsq.quant.types import QuantizedWeight

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16")
# Block types a tensor gsq did not quantize (embeddings, an untied lm_head) may be converted to
# with `--type PATTERN=TYPE`, rounded by the gguf package's reference quantizers as llama.cpp does
# (lossy by nature, listed in the report's "converted"), e.g. token_embd=Q8_0 as in llama.cpp's
# own Q4_K_M / Q4_0 files.
CONVERTIBLE_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")

# llama.cpp types that the gguf package (0.19) lacks: name -> (type id, elements/block, bytes/block)
_EXTRA_TYPES = {"Q2_0": (42, 64, 18)}
# general.file_type (llama.cpp's LLAMA_FTYPE_*) named after the type holding most quantized bytes.
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q2_K": 10, "Q3_K": 12,
               "Q4_K": 15, "Q6_K": 18, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37, "Q2_0": 41}
SUPPORTED_MODEL_TYPES = ("llama",)

# HF pre-tokenizer layouts we can name for llama.cpp (tokenizer.ggml.pre).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# --------------------------------------------------------------------------------------------
# GGUF tensor types


def type_id(name: str) -> int:
    """ggml type id of a type name ('Q4_0' -> 2, 'Q2_0' -> 42)."""
    import gguf

    if name in _EXTRA_TYPES:
        return _EXTRA_TYPES[name][0]
    try:
        return int(gguf.GGMLQuantizationType[name])
    except KeyError:
        raise GSQError(f"unknown GGUF tensor type '{name}'") from None


def type_name(tid: int) -> str:
    """Name of a ggml type id (42 -> 'Q2_0')."""
    import gguf

    for name, (extra_id, _, _) in _EXTRA_TYPES.items():
        if extra_id == tid:
            return name
    try:
        return gguf.GGMLQuantizationType(tid).name
    except ValueError:
        raise GSQError(f"unknown GGUF tensor type id {tid}") from None


def row_bytes(tid: int, n: int) -> int:
    """Bytes of one row of `n` elements of type `tid`; GSQError unless n is a whole number of
    blocks."""
    import gguf

    name = type_name(tid)
    if name in _EXTRA_TYPES:
        _, block, size = _EXTRA_TYPES[name]
    else:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tid)]
    if n % block:
        raise GSQError(f"a row of {n} elements is not a whole number of {name} blocks ({block})")
    return n // block * size


def export_types() -> tuple[str, ...]:
    """Every type a gsq tensor can be written in (those `gguf_blocks` encodes)."""
    from gsq.export.gguf_blocks import BLOCK_TYPES

    return tuple(BLOCK_TYPES)


def _check_type(name: str, allowed: tuple[str, ...] | None = None) -> str:
    allowed = allowed or export_types()
    upper = name.strip().upper()
    if upper not in allowed:
        raise GSQError(f"GGUF type must be one of {', '.join(allowed)}; got '{name}'")
    return upper


# --------------------------------------------------------------------------------------------
# Reading GGUF files (lenient about type ids the gguf package lacks)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: raw bytes `data` uint8 [rows, bytes_per_row] (rows = product of
    all but the fastest dimension) and `shape` in numpy order ([out, in] for a weight)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    data: np.ndarray


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """(fields, tensors) of a GGUF file; fields map key -> gguf.ReaderField.

    GSQError if the file is missing, not GGUF, truncated, or holds an unknown tensor type.
    """
    from gguf import GGUFReader

    class _Reader(GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            self.tensors = []
            self.raw_tensors = [_raw_tensor(self, start_offs, field) for field in fields]

    path = Path(path)
    if not path.is_file():
        raise GSQError(f"GGUF file '{path}' does not exist")
    try:
        reader = _Reader(path)
    except GSQError as err:
        raise GSQError(f"cannot read GGUF file '{path}': {err}") from err
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GSQError(
            f"cannot read GGUF file '{path}' (truncated or not GGUF?): {reason}") from err
    return dict(reader.fields), reader.raw_tensors


def _raw_tensor(reader: Any, start_offs: int, field: Any) -> GGUFTensor:
    """One tensor-info field -> GGUFTensor with a view of its bytes (checked against the file
    size)."""
    _, name_data, _, dims, raw_type, offset = field.parts
    name = bytes(name_data).decode("utf-8")
    tid = int(raw_type[0])
    dims = [int(d) for d in dims]  # fastest first
    rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
    width = row_bytes(tid, dims[0])
    start = int(start_offs + offset[0])
    if start + rows * width > len(reader.data):
        raise GSQError(f"tensor '{name}' runs past the end of the file")
    data = reader.data[start:start + rows * width].reshape(rows, width)
    return GGUFTensor(name, type_name(tid), tuple(reversed(dims)), data)


def field_value(field: Any) -> Any:
    """A reader field's value (str, number, bool or list)."""
    return field.contents()


def missing_types(tensors: list[GGUFTensor]) -> list[str]:
    """Tensor types of a file that the `gguf` package (and so transformers' GGUF reader) lacks,
    e.g. ['Q2_0']; gsq's own decoders read them (`decode_tensor`)."""
    import gguf

    known = {t.name for t in gguf.GGMLQuantizationType}
    return sorted({t.type_name for t in tensors} - known)


@contextmanager
def metadata_only_gguf(fields: dict[str, Any], name: str = "metadata.gguf") -> Iterator[Path]:
    """Yield a GGUF file holding the keys `fields` (from `read_gguf`) and no tensors, in a
    temporary folder removed afterwards.

    transformers' GGUF reader rejects a whole file for one tensor type the `gguf` package lacks
    (Q2_0), but builds a config and a tokenizer from the keys alone, so it is given this copy.
    """
    from gguf import GGUFValueType, GGUFWriter

    with tempfile.TemporaryDirectory(prefix="gsq-gguf-meta-") as tmp:
        path = Path(tmp) / name
        writer = GGUFWriter(path, field_value(fields["general.architecture"]))
        for key, field in fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue  # written by GGUFWriter itself
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, field_value(field), field.types[0], sub_type=sub)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        yield path


def decode_tensor(t: GGUFTensor) -> np.ndarray:
    """float32 values of any tensor in `t.shape` (gsq's decoders, else gguf.quants')."""
    import gguf

    from gsq.export.gguf_blocks import BLOCK_TYPES, decode_weight

    cols = t.shape[-1]
    if t.type_name in BLOCK_TYPES:
        values = decode_weight(t.type_name, t.data, cols)
    else:
        try:
            values = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType[t.type_name])
        except (NotImplementedError, KeyError) as err:
            raise GSQError(f"cannot decode tensor '{t.name}' of type {t.type_name}") from err
    return np.array(values, dtype=np.float32).reshape(t.shape)  # a copy: the file is read-only


# --------------------------------------------------------------------------------------------
# Architecture metadata from the HF config


@dataclass(frozen=True)
class LlamaHParams:
    """What llama.cpp's `llama` architecture reads from the GGUF keys (B.2)."""

    n_layer: int
    n_ctx: int
    d_model: int
    d_ff: int
    n_head: int
    n_kv_head: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    n_vocab: int
    tied: bool  # lm_head shares the embedding matrix (no output.weight tensor)


def llama_hparams(config: Any) -> LlamaHParams:
    """LlamaHParams from a transformers config; GSQError for anything llama.cpp's `llama`
    architecture would run differently (other model types, biases, rope scaling, activations)."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise GSQError(f"GGUF export supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                       f"this model is '{model_type}'")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GSQError("GGUF export does not support Llama models with linear biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GSQError(f"GGUF export needs hidden_act 'silu'; got '{config.hidden_act}'")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise GSQError(f"GGUF export does not support rope scaling '{rope_type}'")
    n_head = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    return LlamaHParams(
        n_layer=int(config.num_hidden_layers), n_ctx=int(config.max_position_embeddings),
        d_model=int(config.hidden_size), d_ff=int(config.intermediate_size), n_head=n_head,
        n_kv_head=int(getattr(config, "num_key_value_heads", None) or n_head), head_dim=head_dim,
        rms_eps=float(config.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        n_vocab=int(config.vocab_size), tied=bool(getattr(config, "tie_word_embeddings", False)))


def add_hparams(writer: Any, hp: LlamaHParams) -> None:
    """The `llama.*` keys of B.2 (general.architecture is written by GGUFWriter itself)."""
    writer.add_block_count(hp.n_layer)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.d_model)
    writer.add_feed_forward_length(hp.d_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_kv_head)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim * hp.n_head != hp.d_model:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_quantization_version(2)


# --------------------------------------------------------------------------------------------
# Tensors: names, the q/k permutation, the per-tensor plan


def gguf_tensor_name(hf_name: str, n_layer: int) -> str:
    """'model.layers.0.self_attn.q_proj.weight' -> 'blk.0.attn_q.weight' (B.3)."""
    import gguf

    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer).get_name(
        hf_name, try_suffixes=(".weight",))
    if name is None:
        raise GSQError(f"tensor '{hf_name}' has no llama.cpp 'llama' counterpart")
    return name


def qk_heads(gguf_name: str, hp: LlamaHParams) -> int | None:
    """Heads of the rows to permute: n_head for attn_q, n_kv_head for attn_k, else None."""
    if gguf_name.endswith(".attn_q.weight"):
        return hp.n_head
    if gguf_name.endswith(".attn_k.weight"):
        return hp.n_kv_head
    return None


def permute_rows(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split rotary rows -> llama.cpp's interleaved ones (B.3), for any [out, ...]
    tensor: a weight [out, in], codes [out, in] or scales [out, in/G] alike."""
    out = x.shape[0]
    if out % (2 * n_heads):
        raise GSQError(f"{out} rows cannot be split into {n_heads} heads of rotary pairs")
    return (x.reshape(n_heads, 2, out // n_heads // 2, *x.shape[1:]).transpose(1, 2)
            .reshape(x.shape))


def rotary_rows(x: np.ndarray, n_heads: int, to_hf: bool) -> np.ndarray:
    """Reorder the rows of an `(out, ...)` array between HF's half-split rotary layout and
    llama.cpp's interleaved one (`permute_rows` is the HF -> llama.cpp direction in torch)."""
    out = x.shape[0]
    if out % (2 * n_heads):
        raise GSQError(f"{out} rows cannot be split into {n_heads} heads of rotary pairs")
    half = out // n_heads // 2
    split = (n_heads, half, 2) if to_hf else (n_heads, 2, half)
    return np.ascontiguousarray(x.reshape(*split, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape))


def hf_values(t: GGUFTensor, heads: int | None) -> torch.Tensor:
    """The decoded tensor (fp32, `t.shape`) in HF row order: attn_q / attn_k rows (`heads` from
    `qk_heads`) taken back from llama.cpp's interleaved rotary order; None: as stored."""
    values = decode_tensor(t)
    return torch.from_numpy(rotary_rows(values, heads, True) if heads else values)


def match_tensors(tensors: list[GGUFTensor], model: torch.nn.Module, hp: LlamaHParams,
                  path: str | Path, owner: str = "the base model") -> dict[str, str]:
    """GGUF name -> HF parameter name for every entry of `model.state_dict()` (`lm_head.weight`
    left out when tied: llama.cpp reuses token_embd); GSQError naming the first tensor the file
    lacks or whose shape differs (`owner` names the model in it). File tensors without a
    counterpart are left out."""
    by_name = {t.name: t for t in tensors}
    out = {}
    for hf_name, value in model.state_dict().items():
        if hp.tied and hf_name == "lm_head.weight":
            continue
        gguf_name = gguf_tensor_name(hf_name, hp.n_layer)
        t = by_name.get(gguf_name)
        if t is None:
            raise GSQError(f"{owner} does not match '{path}': the file has no tensor "
                           f"'{gguf_name}' (for '{hf_name}')")
        if tuple(t.shape) != tuple(value.shape):
            raise GSQError(f"{owner} does not match '{path}': '{gguf_name}' is "
                           f"{list(t.shape)} in the file but {list(value.shape)} in {owner}")
        out[gguf_name] = hf_name
    return out


def permute_record(qw: QuantizedWeight, n_heads: int) -> QuantizedWeight:
    """The same row permutation applied to codes and scales: rows of s·c are permuted."""
    return QuantizedWeight(permute_rows(qw.codes, n_heads), permute_rows(qw.scale, n_heads),
                           qw.spec)


@dataclass
class PlannedTensor:
    """One GGUF tensor to write: its type and where its values come from (exactly one of
    `record`, a quantized linear, and `load`, a float tensor)."""

    gguf_name: str
    hf_name: str  # parameter name, e.g. model.layers.0.mlp.down_proj.weight
    shape: tuple[int, ...]  # numpy order: [out, in] or [d]
    qtype: str
    record: QuantizedWeight | None = None
    load: Callable[[], torch.Tensor] | None = None

    @property
    def module(self) -> str:
        return self.hf_name.removesuffix(".weight")

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return rows * row_bytes(type_id(self.qtype), self.shape[-1])


def plan_tensors(float_weights: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]],
                 records: dict[str, QuantizedWeight], hp: LlamaHParams, float_type: str,
                 overrides: dict[str, str] | None = None) -> list[PlannedTensor]:
    """Every tensor of the GGUF file, in llama.cpp's order, with its type.

    float_weights: HF parameter name -> (shape, loader) of the checkpoint's tensors; records: the
    quantized linears by module name (their float copies in the checkpoint are not used).
    Quantized linears get the GGUF type they were quantized for (`qw.spec.target`, see
    `gsq quantize --target`) or else `default_type(qw)`, 1-D tensors F32, other tensors
    `float_type`; an override (fnmatch pattern -> type, last match wins) applies to the module
    name, the HF name or the GGUF name.
    """
    from gsq.export.gguf_blocks import default_type

    float_type = _check_type(float_type, FLOAT_TYPES)
    shapes = {name: shape for name, (shape, _) in float_weights.items()}
    shapes.update({f"{m}.weight": tuple(qw.shape) for m, qw in records.items()})
    planned = []
    for hf_name, shape in shapes.items():
        if hp.tied and hf_name == "lm_head.weight" and "lm_head" not in records:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = gguf_tensor_name(hf_name, hp.n_layer)
        record = records.get(hf_name.removesuffix(".weight"))
        if record is not None:
            qtype = record.spec.target or default_type(record)
            planned.append(PlannedTensor(gguf_name, hf_name, shape, qtype, record))
        else:
            qtype = "F32" if len(shape) == 1 else float_type
            planned.append(PlannedTensor(gguf_name, hf_name, shape, qtype,
                                         load=float_weights[hf_name][1]))
    _apply_overrides(planned, overrides or {})
    for t in planned:
        try:
            t.nbytes  # noqa: B018 (checks that the rows are whole blocks of the type)
        except GSQError as err:
            raise GSQError(f"'{t.module}' cannot be stored as {t.qtype}: {err}") from None
    return sorted(planned, key=_gguf_order)


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
            if len(t.shape) == 1 and qtype != "F32":
                raise GSQError(f"'{t.hf_name}' is 1-D (a norm); it is always stored as F32")
            if t.record is None and qtype not in FLOAT_TYPES + CONVERTIBLE_TYPES:
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
    from gsq.export.gguf_blocks import exact_problem

    problems = {}
    for t in planned:
        if t.record is not None:
            problem = exact_problem(t.qtype, t.record)
            if problem:
                problems[t.module] = f"{t.qtype}: {problem}"
    if problems and not lossy:
        first, reason = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""
        raise GSQError(f"cannot store '{first}' exactly as {reason}{more}; choose another --type "
                       f"or pass --lossy to round")
    return problems


def encode_tensor(t: PlannedTensor, hp: LlamaHParams, lossy: bool) -> np.ndarray:
    """The bytes (or float array) written for one planned tensor, q/k rows permuted."""
    heads = qk_heads(t.gguf_name, hp)
    if t.record is not None:
        from gsq.export.gguf_blocks import encode_weight

        qw = permute_record(t.record, heads) if heads else t.record
        data = encode_weight(t.qtype, qw, lossy=lossy)
    else:
        weight = t.load().detach().float().cpu()
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
# Tokenizer keys


KeyValue = tuple[str, Any, Any, Any]  # (key, value, GGUFValueType, array element type or None)


def tokenizer_kv_from_gguf(path: str | Path, n_vocab: int) -> list[KeyValue]:
    """Every `tokenizer.*` key of a GGUF file, to copy verbatim (B.2's practical rule)."""
    from gguf import GGUFValueType

    fields, _ = read_gguf(path)
    kv = []
    for key, field in fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            kv.append((key, field_value(field), field.types[0], sub))
    tokens = next((v for k, v, _, _ in kv if k == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise GSQError(f"GGUF file '{path}' has no tokenizer")
    if len(tokens) != n_vocab:
        raise GSQError(f"the tokenizer of '{path}' has {len(tokens)} tokens but the model's "
                       f"vocabulary has {n_vocab}")
    return kv


def tokenizer_kv_from_hf(tok_dir: str | Path, n_vocab: int) -> list[KeyValue]:
    """llama.cpp tokenizer keys converted from an HF `tokenizer.json` of byte-level BPE type
    (GPT-2, SmolLM, Llama-3 pre-tokenizers); GSQError for any other tokenizer."""
    from gguf import GGUFValueType as V

    tok_dir = Path(tok_dir)
    spec = _read_tokenizer_json(tok_dir)
    pre = bpe_pre_name(spec)
    tokens, types = _bpe_tokens(spec, n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if not merges:
        raise GSQError(f"the tokenizer in '{tok_dir}' has no BPE merges; llama.cpp needs them")
    kv: list[KeyValue] = [
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.pre", pre, V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
    ]
    return kv + _special_kv(tok_dir, n_vocab)


def _read_tokenizer_json(tok_dir: Path) -> dict:
    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise GSQError(f"'{tok_dir}' has no tokenizer.json; only fast (tokenizer.json) "
                       "tokenizers can be converted to GGUF")
    return json.loads(path.read_text(encoding="utf-8"))


def bpe_pre_name(spec: dict) -> str:
    """llama.cpp's pre-tokenizer name for an HF tokenizer.json, or GSQError if it is not one of
    the byte-level BPE layouts we can name: 'gpt-2', 'smollm' (digits split, then GPT-2) or
    'llama-bpe' (the Llama-3 regex)."""
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or \
            decoder.get("type") != "ByteLevel":
        raise GSQError("only byte-level BPE tokenizers (GPT-2 / SmolLM / Llama-3 style) can be "
                       "converted to GGUF; export from a .gguf source to copy its tokenizer")
    if spec.get("normalizer"):
        raise GSQError("cannot convert a byte-level BPE tokenizer with a normalizer to GGUF")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    # llama.cpp looks whole words up before merging for llama-bpe only (HF: ignore_merges)
    ignore_merges = bool(model.get("ignore_merges"))
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and \
            not steps[0].get("add_prefix_space") and not ignore_merges:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and \
            steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space") and \
            not ignore_merges:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and \
            (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_REGEX and \
            not steps[1].get("use_regex", True) and ignore_merges:
        return "llama-bpe"
    raise GSQError(f"cannot name this tokenizer's pre-tokenizer ({'+'.join(map(str, kinds))}) "
                   "for llama.cpp")


def _bpe_tokens(spec: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types by id, padded to n_vocab with unused tokens."""
    from gguf import TokenType

    by_id = {int(i): (tok, int(TokenType.NORMAL)) for tok, i in spec["model"]["vocab"].items()}
    for added in spec.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], int(kind))
    if max(by_id) >= n_vocab:
        raise GSQError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary has "
                       f"{n_vocab} entries")
    tokens, types = [], []
    for i in range(n_vocab):
        tok, kind = by_id.get(i, (f"[PAD{i}]", int(TokenType.UNUSED)))
        tokens.append(tok)
        types.append(kind)
    return tokens, types


def _special_kv(tok_dir: Path, n_vocab: int) -> list[KeyValue]:
    """bos/eos/unk/pad ids and the chat template (gguf.SpecialVocab), and whether the HF tokenizer
    adds BOS/EOS to an encoded text."""
    import gguf
    from gguf import GGUFValueType as V

    keys = gguf.Keys.Tokenizer
    key_of = {"bos": keys.BOS_ID, "eos": keys.EOS_ID, "unk": keys.UNK_ID, "pad": keys.PAD_ID,
              "sep": keys.SEP_ID, "mask": keys.MASK_ID}
    special = gguf.SpecialVocab(tok_dir, load_merges=False, n_vocab=n_vocab)
    kv: list[KeyValue] = [(key_of[kind], tid, V.UINT32, None)
                          for kind, tid in special.special_token_ids.items() if kind in key_of]
    add_bos, add_eos = _adds_bos_eos(tok_dir)
    kv += [("tokenizer.ggml.add_bos_token", add_bos, V.BOOL, None),
           ("tokenizer.ggml.add_eos_token", add_eos, V.BOOL, None)]
    if isinstance(special.chat_template, str):
        kv.append(("tokenizer.chat_template", special.chat_template, V.STRING, None))
    return kv


def _adds_bos_eos(tok_dir: Path) -> tuple[bool, bool]:
    """Does the HF tokenizer put BOS first / EOS last when special tokens are on?"""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    add_bos = tok.bos_token_id is not None and len(with_special) > len(plain) and \
        with_special[0] == tok.bos_token_id
    add_eos = tok.eos_token_id is not None and len(with_special) > len(plain) and \
        with_special[-1] == tok.eos_token_id
    return bool(add_bos), bool(add_eos)


# --------------------------------------------------------------------------------------------
# Writing


@contextmanager
def atomic_output_file(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `out`; rename it to `out` only if the block succeeds."""
    out = check_output_path(out, overwrite)
    if out.is_dir():
        raise GSQError(f"output path '{out}' is a directory")
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_gguf(out: str | Path, hp: LlamaHParams, planned: list[PlannedTensor],
               tokenizer_kv: list[KeyValue], *, name: str, lossy: bool = False,
               overwrite: bool = False) -> dict:
    """Write the GGUF file (header, keys, tensor infos, then each tensor encoded in turn, so only
    one tensor's bytes are in memory at a time). Returns the report of `export_gguf`."""
    from gguf import GGUFWriter

    with atomic_output_file(out, overwrite) as tmp:
        writer = GGUFWriter(tmp, "llama")
        writer.add_name(name)
        writer.add_quantized_by("gsq")
        add_hparams(writer, hp)
        writer.add_file_type(_file_type(planned))
        for key, value, vtype, sub in tokenizer_kv:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for t in planned:
            writer.add_tensor_info(t.gguf_name, list(t.shape), np.dtype(np.int8), t.nbytes,
                                   raw_dtype=type_id(t.qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in planned:
            writer.write_tensor_data(encode_tensor(t, hp, lossy))
        writer.close()
        size = tmp.stat().st_size
    return _report(out, planned, size)


def _file_type(planned: list[PlannedTensor]) -> int:
    """general.file_type: the type holding most quantized bytes (informational only)."""
    weights = Counter()
    for t in planned:
        weights[t.qtype if t.record is not None else "F16"] += t.nbytes
    return _FILE_TYPES.get(weights.most_common(1)[0][0], 1024)  # 1024 = "guessed"


def _report(out: str | Path, planned: list[PlannedTensor], size: int) -> dict:
    quantized = [t for t in planned if t.record is not None]
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
    hp = llama_hparams(_read_config(qdir))
    records = load_records(qdir)
    planned = plan_tensors(_checkpoint_weights(qdir), records, hp, float_type, type_overrides)
    inexact = check_exact(planned, lossy)
    tokenizer_kv, tokenizer_from = quantized_dir_tokenizer(qdir, hp.n_vocab)
    report = write_gguf(out, hp, planned, tokenizer_kv, name=qdir.resolve().name, lossy=lossy,
                        overwrite=overwrite)
    converted = {t.module: t.qtype for t in planned
                 if t.record is None and t.qtype in CONVERTIBLE_TYPES}
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
    from gsq.models.loading import load_base_model, resolve_model_source

    check_output_path(out, overwrite)
    resolved = resolve_model_source(model_source)
    model, tokenizer = load_base_model(resolved)
    hp = llama_hparams(model.config)
    state = model.state_dict()
    weights = {k: (tuple(v.shape), (lambda v=v: v)) for k, v in state.items()}
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
    except (OSError, ValueError) as err:
        raise GSQError(f"cannot read the model config of '{qdir}': {err}") from err


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
