"""Export a gsq quantized directory as a compressed-tensors `pack-quantized` checkpoint.

The output is a Hugging Face checkpoint that `transformers` (with the `compressed-tensors` package)
and vLLM load. Per quantized Linear with prefix P and weight `(out, in)` it holds:

  P.weight_packed  int32 `(out, ceil(in*b/32))`  codes c offset to u = c + 2**(b-1), packed along
                                                   the input dimension by compressed-tensors'
                                                   own `pack_to_int32` (dense layout)
  P.weight_scale   float `(out, in/G)`            the group scales s, in the checkpoint's dtype
  P.weight_shape   int64 `(2,)`                   `[out, in]`

and no `P.weight`; every other tensor is copied unchanged. Loaders dequantize w = s*c, so the
weights they rebuild equal gsq's `s*codes` exactly (in the checkpoint dtype).

MoE experts are exported the same way, one P per expert projection under its checkpoint name
(`...mlp.experts.5.gate_proj`, Mixtral's `...block_sparse_moe.experts.5.w1`): the per-expert
layout vLLM maps onto its fused-MoE layer and transformers stacks into its fused parameters. The
routers (Linear layers for engines) stay dense and are listed in `ignore`.

Stored bit-widths `b`: 2, 3, 4 natively (ternary codes {-1,0,1} go into the 2-bit grid), or a
4-/8-bit container (`container_bits`) for engines whose kernels only take 4 or 8 bits. Where the
stored grid can hold the negated codes (containers, ternary) a negative group scale is made
positive by negating scale and codes, which leaves s*c unchanged; only native 2-bit (and 3-/4-bit
groups whose -qmin does not fit) keep negative scales.

3-bit packing changed in compressed-tensors 0.18 (padded -> dense). The layout actually
produced by the installed library is probed, recorded in `config.json` (the library `version`
inside `quantization_config` plus the top-level `gsq_export.packing_layout`), and native 3-bit
is refused with the old padded layout.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from gsq.errors import GSQError
from gsq.io.quantized_dir import (
    CODES_FILE,
    META_FILE,
    REPORT_FILE,
    atomic_output_dir,
    is_quantized_dir,
    load_records,
)
from gsq.models.registry import COMPRESSED_TENSORS, check_architecture
from gsq.quant.types import QuantizedWeight

FORMAT = "pack-quantized"
CONTAINER_CHOICES = (None, 4, 8)
DENSE_LAYOUT = "dense"  # compressed-tensors >= 0.18: 32 codes fill exactly b int32 words
PADDED_LAYOUT = "padded"  # compressed-tensors <= 0.17: floor(32/b) codes per word, top bits zero
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SKIPPED_FILES = {CODES_FILE, META_FILE, REPORT_FILE, "config.json", INDEX_FILE}
_SKIPPED_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


# ---------------------------------------------------------------------------------------------
# compressed-tensors: packer, layout probe


def _library():
    """(version, pack_to_int32, unpack_from_int32) of the installed compressed-tensors."""
    try:
        import compressed_tensors
    except ImportError as err:
        raise GSQError("compressed-tensors export needs the 'compressed-tensors' package "
                       "(pip install 'compressed-tensors>=0.20')") from err
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import (
            pack_to_int32,
            unpack_from_int32,
        )
    except ImportError:  # <= 0.17 kept the helpers under quantized_compressors
        from compressed_tensors.compressors.quantized_compressors.pack_quantized import (
            pack_to_int32,
            unpack_from_int32,
        )
    return compressed_tensors.__version__, pack_to_int32, unpack_from_int32


def pack_codes(codes: Tensor, num_bits: int) -> Tensor:
    """Signed codes `(out, in)` -> int32 `(out, ceil(in*b/32))` with the library's packer.

    The library offsets the codes by 2**(b-1) itself; the result is unpacked again and compared,
    so a packer/unpacker disagreement fails the export instead of writing a misread file.
    """
    _, pack, unpack = _library()
    codes = codes.to(torch.int8).contiguous()
    packed = pack(codes, num_bits)
    if not torch.equal(unpack(packed, num_bits, codes.shape), codes):
        raise GSQError(f"compressed-tensors {num_bits}-bit packing did not round-trip exactly")
    return packed


def packing_layout() -> str:
    """'dense' or 'padded': how the installed packer lays out 3-bit codes.

    32 three-bit codes take 3 words densely and ceil(32/10) = 4 words padded; for 1/2/4/8 bits
    the two layouts coincide.
    """
    _, pack, _ = _library()
    probe = (torch.arange(64, dtype=torch.int8) % 8 - 4).reshape(2, 32)
    words = pack(probe, 3).shape[1]
    if words == 3:
        return DENSE_LAYOUT
    if words == 4:
        return PADDED_LAYOUT
    raise GSQError(f"unknown compressed-tensors 3-bit packing ({words} words for 32 codes)")


# ---------------------------------------------------------------------------------------------
# per-module encoding


def stored_bits(qw: QuantizedWeight, container_bits: int | None) -> int:
    """Bits per stored code: the gsq grid's (ternary -> 2), widened to the container if larger."""
    native = 2 if qw.spec.is_ternary else int(qw.spec.bits)
    return max(native, container_bits or 0)


def encode_module(qw: QuantizedWeight, num_bits: int) -> tuple[Tensor, Tensor, int]:
    """(codes int8 `(out, in)`, scale fp32 `(out, in/G)`, negative groups left) for a b-bit grid.

    A group with s < 0 is rewritten as (-s, -c) when -qmin fits the stored grid
    (qmax_b = 2**(b-1) - 1): always in a wider container and for ternary; never for native
    2/3/4-bit, whose mirrored groups keep s < 0 (loaders apply the sign as is).
    """
    codes, scale = qw.codes.to(torch.int8), qw.scale.float()
    if int(codes.min()) < -(2 ** (num_bits - 1)) or int(codes.max()) > 2 ** (num_bits - 1) - 1:
        raise GSQError(f"codes of {qw.spec.label} do not fit a {num_bits}-bit grid")
    if -qw.spec.qmin <= 2 ** (num_bits - 1) - 1:
        flip = scale < 0  # (out, n_groups)
        sign = torch.where(flip, -1, 1).repeat_interleave(qw.spec.group_size, dim=1)
        codes = (codes * sign).to(torch.int8)
        scale = scale.abs()
    return codes, scale, int((scale < 0).sum())


def check_scales(name: str, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """`scale` cast to the stored dtype; GSQError unless that is exact and finite."""
    stored = scale.to(dtype)
    exact = torch.isfinite(scale) & (stored.float() == scale)
    if not bool(exact.all()):
        bad = float(scale[~exact][0])
        raise GSQError(f"scale {bad!r} of {name} is not representable in {_dtype_name(dtype)}, "
                       "the checkpoint dtype (export from a bfloat16 or float32 checkpoint)")
    return stored.contiguous()


def module_tensors(name: str, qw: QuantizedWeight, num_bits: int,
                   scale_dtype: torch.dtype) -> tuple[dict[str, Tensor], int]:
    """The three compressed-tensors tensors of one module, and its negative-scale group count."""
    codes, scale, negative = encode_module(qw, num_bits)
    tensors = {
        f"{name}.weight_packed": pack_codes(codes, num_bits),
        f"{name}.weight_scale": check_scales(name, scale, scale_dtype),
        f"{name}.weight_shape": torch.tensor(list(qw.shape), dtype=torch.int64),
    }
    return tensors, negative


# ---------------------------------------------------------------------------------------------
# source checkpoint


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def checkpoint_dtype(config: dict, dense: dict[str, Tensor]) -> torch.dtype:
    """The dtype loaders give the scales: config `dtype`/`torch_dtype`, else the dense weights'.

    Scales are stored in it so that dequantizing in the scale dtype (transformers' load-time
    path) yields s*c rounded once to the model dtype, as gsq's own loader does.
    """
    name = config.get("dtype") or config.get("torch_dtype")
    if name is None and dense:
        name = _dtype_name(next(iter(dense.values())).dtype)
    return _DTYPES.get(str(name), torch.float32)


def weight_shards(qdir: Path) -> list[str]:
    """File names of the checkpoint's safetensors shards (single file or indexed)."""
    index = qdir / INDEX_FILE
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (qdir / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise GSQError(f"'{qdir}' has no {SINGLE_FILE} (or {INDEX_FILE}) to export")


def linear_modules(qdir: Path) -> tuple[list[str], list[str]]:
    """(every linear weight of the checkpoint, the MoE experts' among them), by checkpoint name,
    from the model built on the meta device (no weights read). Linears are the nn.Linear
    modules plus, for MoE models, each expert projection and the routers (the adapter's
    `checkpoint_linears`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gsq.models.registry import adapter_for

    try:
        cfg = AutoConfig.from_pretrained(str(qdir))
    except (OSError, ValueError, KeyError) as err:
        raise GSQError(f"cannot read the model config in '{qdir}': {err}") from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    adapter = adapter_for(cfg.model_type)
    return adapter.checkpoint_linears(model), adapter.expert_linears(model)


def dense_weights(qdir: Path, shards: list[str], names: list[str]) -> dict[str, Tensor]:
    """`{module: meta tensor}` with the shape/dtype of each quantized module's dense weight."""
    wanted, found = {f"{n}.weight": n for n in names}, {}
    for shard in shards:
        with safe_open(str(qdir / shard), framework="pt") as f:
            for key in wanted.keys() & set(f.keys()):
                sl = f.get_slice(key)
                found[wanted[key]] = torch.empty(sl.get_shape(), device="meta",
                                                 dtype=_DTYPES.get(_st_dtype(sl), torch.float32))
    return found


def _st_dtype(tensor_slice) -> str:
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(tensor_slice.get_dtype(),
                                                                       "float32")


def validate_records(records: dict[str, QuantizedWeight], linears: list[str],
                     dense: dict[str, Tensor]) -> None:
    """Every record must be a Linear of the model with a dense weight of the codes' shape."""
    linear_set = set(linears)
    for name, qw in records.items():
        if name not in linear_set:
            raise GSQError(f"quantized module '{name}' is not a Linear of the model")
        if name not in dense:
            raise GSQError(f"the checkpoint has no dense weight for quantized module '{name}'")
        if tuple(dense[name].shape) != qw.shape:
            raise GSQError(f"shape mismatch for {name}: checkpoint {tuple(dense[name].shape)}, "
                           f"codes {qw.shape}")


# ---------------------------------------------------------------------------------------------
# quantization_config


def config_groups(schemes: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """One config group per distinct (num_bits, group_size).

    A single group targets the class "Linear" (the `ignore` list excludes the rest); several
    groups target their exact module names so no module matches two schemes.
    """
    by_scheme: dict[tuple[int, int], list[str]] = defaultdict(list)
    for name, scheme in schemes.items():
        by_scheme[scheme].append(name)
    groups = {}
    for i, (bits, group) in enumerate(sorted(by_scheme)):
        targets = ["Linear"] if len(by_scheme) == 1 else sorted(by_scheme[(bits, group)])
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": group, "dynamic": False, "actorder": None,
                        "observer": None},
            "input_activations": None,
            "output_activations": None,
        }
    return groups


def quantization_config(schemes: dict[str, tuple[int, int]], ignore: list[str],
                        version: str) -> dict:
    """The `quantization_config` of config.json, checked by the library."""
    qconfig = {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "version": version,
        "config_groups": config_groups(schemes),
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }
    from compressed_tensors.quantization import QuantizationConfig

    try:
        QuantizationConfig.model_validate(qconfig)
    except ValueError as err:
        raise GSQError(f"compressed-tensors rejected the export config: {err}") from err
    return qconfig


# ---------------------------------------------------------------------------------------------
# report helpers


def family(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.*.mlp.up_proj'."""
    return re.sub(r"\.\d+\.", ".*.", name)


def family_bits(records: dict[str, QuantizedWeight],
                schemes: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """Per module family: gsq bit labels, stored num_bits and group sizes (sorted, distinct)."""
    out: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for name, qw in records.items():
        fam = out[family(name)]
        fam["bits"].add(str(qw.spec.bits))
        fam["stored_bits"].add(schemes[name][0])
        fam["group_size"].add(qw.spec.group_size)
    return {f: {k: sorted(v) for k, v in d.items()} for f, d in sorted(out.items())}


def fused_notes(schemes: dict[str, tuple[int, int]], linears: list[str]) -> list[str]:
    """Warn where q/k/v or gate/up of one layer differ in scheme (vLLM fuses them)."""
    notes = []
    for parts in _FUSED:
        layers: dict[str, set] = defaultdict(set)
        for name in linears:
            prefix, _, leaf = name.rpartition(".")
            if leaf in parts:
                layers[prefix].add(schemes.get(name))
        mixed = sorted(p for p, s in layers.items() if len(s) > 1)
        if mixed:
            notes.append(f"{'/'.join(parts)} differ in (bits, group size) or quantized-ness in "
                         f"{len(mixed)} layer(s), e.g. {mixed[0]}; vLLM fuses these and may "
                         "refuse the checkpoint")
    return notes


def moe_notes(schemes: dict[str, tuple[int, int]], experts: list[str]) -> list[str]:
    """MoE engines' constraints: one scheme for all experts; vLLM's fused-MoE kernels (WNA16)
    take 4- or 8-bit codes only."""
    used = {schemes[n] for n in experts if n in schemes}
    notes = []
    if len(used) > 1 or (used and len(used) < len({schemes.get(n) for n in experts})):
        notes.append("the MoE experts differ in (bits, group size) or quantized-ness; vLLM's "
                     "fused-MoE layers and transformers' expert loader take one scheme for all "
                     "experts")
    if any(bits not in (4, 8) for bits, _ in used):
        notes.append("vLLM's fused-MoE kernels take 4- or 8-bit experts only: export with "
                     "container_bits=4 (--container-bits 4) to serve this checkpoint with vLLM")
    return notes


# ---------------------------------------------------------------------------------------------
# writing


def write_shards(qdir: Path, tmp: Path, shards: list[str],
                 compressed: dict[str, dict[str, Tensor]]) -> dict[str, str]:
    """Copy each shard with P.weight replaced by P's compressed tensors; returns the weight map."""
    weight_map = {}
    for shard in shards:
        tensors = {}
        for key, value in load_file(str(qdir / shard)).items():
            module = key.removesuffix(".weight")
            tensors.update(compressed[module] if module in compressed and key != module
                           else {key: value})
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    return weight_map


def write_index(qdir: Path, tmp: Path, weight_map: dict[str, str]) -> None:
    """Rewrite model.safetensors.index.json (if the source had one) for the new tensor names."""
    index = qdir / INDEX_FILE
    if not index.is_file():
        return
    data = json.loads(index.read_text())
    total = sum((tmp / s).stat().st_size for s in set(weight_map.values()))
    data["metadata"] = {**data.get("metadata", {}), "total_size": total}
    data["weight_map"] = dict(sorted(weight_map.items()))
    (tmp / INDEX_FILE).write_text(json.dumps(data, indent=2))


def copy_side_files(qdir: Path, tmp: Path) -> list[str]:
    """Copy tokenizer, generation config and other top-level files; not gsq's own files."""
    copied = []
    for path in sorted(qdir.iterdir()):
        skip = path.name in _SKIPPED_FILES or any(path.match(p) for p in _SKIPPED_PATTERNS)
        if path.is_file() and not skip:
            shutil.copy2(path, tmp / path.name)
            copied.append(path.name)
    return copied


# ---------------------------------------------------------------------------------------------
# entry point


def _check_args(qdir: Path, container_bits: int | None) -> None:
    if container_bits is not None and (type(container_bits) is not int
                                       or container_bits not in CONTAINER_CHOICES):
        raise GSQError(f"container bits must be 4 or 8 (or None for native); "
                       f"got {container_bits!r}")
    if not is_quantized_dir(qdir):
        raise GSQError(f"'{qdir}' is not a gsq quantized directory (no {META_FILE})")
    if not (qdir / "config.json").is_file():
        raise GSQError(f"'{qdir}' has no config.json")
    model_type = json.loads((qdir / "config.json").read_text()).get("model_type")
    check_architecture(model_type, needs=(COMPRESSED_TENSORS,))


def _schemes(records: dict[str, QuantizedWeight], container_bits: int | None,
             layout: str) -> dict[str, tuple[int, int]]:
    """{module: (stored num_bits, group size)}; refuses native 3-bit with the padded layout."""
    schemes = {n: (stored_bits(qw, container_bits), qw.spec.group_size)
               for n, qw in records.items()}
    if layout != DENSE_LAYOUT and any(b not in (1, 2, 4, 8) for b, _ in schemes.values()):
        raise GSQError("the installed compressed-tensors packs 3-bit codes in the old padded "
                       "layout (<= 0.17), which current loaders misread; upgrade to "
                       "compressed-tensors>=0.20 or export with a 4-bit container")
    return schemes


def export_compressed_tensors(qdir, out, *, container_bits: int | None = None,
                              overwrite: bool = False) -> dict:
    """Write gsq directory `qdir` as a compressed-tensors pack-quantized checkpoint at `out`.

    container_bits: None stores each module in its own grid (2/3/4 bits; ternary as 2); 4 or 8
    widens narrower grids to that container. Written atomically (temp dir + rename). Returns a
    report: format, container, packing layout, bits per module family, sizes, notes.
    """
    qdir = Path(qdir)
    _check_args(qdir, container_bits)
    version, _, _ = _library()
    layout = packing_layout()
    records = load_records(qdir)
    if not records:
        raise GSQError(f"'{qdir}' has no quantized modules to export")
    config = json.loads((qdir / "config.json").read_text())
    shards = weight_shards(qdir)
    linears, experts = linear_modules(qdir)
    dense = dense_weights(qdir, shards, list(records))
    validate_records(records, linears, dense)

    schemes = _schemes(records, container_bits, layout)
    scale_dtype = checkpoint_dtype(config, dense)
    compressed, negative = {}, 0
    for name, qw in records.items():
        compressed[name], neg = module_tensors(name, qw, schemes[name][0], scale_dtype)
        negative += neg
    ignore = [n for n in linears if n not in records]
    ternary = sorted(n for n, qw in records.items() if qw.spec.is_ternary)

    gsq_meta = {
        "source_format": "gsq-quantized",
        "packing_layout": layout,
        "compressed_tensors_version": version,
        "container_bits": container_bits,
        "scale_dtype": _dtype_name(scale_dtype),
        "ternary_stored_as": (f"{max(2, container_bits or 0)}-bit codes -1..1"
                              if ternary else None),
        "families": family_bits(records, schemes),
    }
    config["quantization_config"] = quantization_config(schemes, ignore, version)
    config["gsq_export"] = gsq_meta

    with atomic_output_dir(out, overwrite) as tmp:
        weight_map = write_shards(qdir, tmp, shards, compressed)
        write_index(qdir, tmp, weight_map)
        copied = copy_side_files(qdir, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        sizes = _sizes(tmp, records, compressed)

    notes = fused_notes(schemes, linears) + moe_notes(schemes, experts)
    if ternary:
        notes.append(f"{len(ternary)} ternary module(s) stored as "
                     f"{gsq_meta['ternary_stored_as']} (log2(3) bits of information each)")
    if negative:
        notes.append(f"{negative} group(s) keep a negative scale (their negated codes do not fit "
                     "the stored grid); GPU kernels were not verified with negative scales, use "
                     "container_bits=4 (or 8 for 4-bit) if unsure")
    if len(config["quantization_config"]["config_groups"]) > 1:
        notes.append("several config groups (mixed precision): transformers' dequantize=True "
                     "load path applies one scheme to all layers (5.24); load with the default "
                     "path, which decompresses on the first forward pass")
    return {
        "format": f"compressed-tensors/{FORMAT}",
        "path": str(out),
        "container_bits": container_bits,
        "packing_layout": layout,
        "compressed_tensors_version": version,
        "scale_dtype": gsq_meta["scale_dtype"],
        "config_groups": {k: {"num_bits": g["weights"]["num_bits"],
                              "group_size": g["weights"]["group_size"]}
                          for k, g in config["quantization_config"]["config_groups"].items()},
        "families": gsq_meta["families"],
        "quantized_modules": len(records),
        "ignored_modules": ignore,
        "ternary_modules": len(ternary),
        "negative_scale_groups": negative,
        "copied_files": copied,
        "sizes": sizes,
        "notes": notes,
    }


def _sizes(tmp: Path, records: dict[str, QuantizedWeight],
           compressed: dict[str, dict[str, Tensor]]) -> dict:
    """Bytes on disk, and bits per quantized weight including scales."""
    params = sum(qw.codes.numel() for qw in records.values())
    qbytes = sum(t.numel() * t.element_size() for d in compressed.values() for t in d.values())
    counts = Counter(p.suffix for p in tmp.iterdir())
    return {
        "total_bytes": sum(p.stat().st_size for p in tmp.iterdir() if p.is_file()),
        "safetensors_files": counts[".safetensors"],
        "quantized_params": params,
        "quantized_bytes": qbytes,
        "bits_per_quantized_weight": round(8 * qbytes / params, 4),
    }
