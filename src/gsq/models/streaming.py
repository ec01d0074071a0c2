"""Models streamed from disk one block at a time, for models larger than host memory.

`open_model(source)` builds the model's skeleton on the meta device (accelerate's
`init_empty_weights`: parameters without storage; buffers such as rotary frequencies real) and a
`WeightSource` that reads tensors on demand, in their stored dtype:
  * a local folder or hub snapshot of safetensors shards: a module's tensors are read with
    `safe_open`, moved to the compute device, and loaded into the skeleton by transformers' own
    checkpoint conversion (`convert_and_load_state_dict_in_model`: renamed keys, fused MoE experts)
    upcast to fp32 there; `saved` reverts the conversion for writing;
  * a `.gguf` file of the `llama` architecture: tensors decoded one at a time by gsq's decoders
    (`gsq.gguf.hf_values`), the same values transformers' GGUF loader produces;
  * anything else (PyTorch `.bin` checkpoints, GGUF files of other architectures): loaded whole in
    fp32 by `load_base_model` and served from memory, as before streaming existed.
`StreamedBlocks` is the block loop's loader over a source (`gsq.calib.sequential.BlockLoader`):
only the embeddings (while block-0 inputs are captured) and the current block hold real tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gsq.errors import GSQError
from gsq.io.shards import DTYPES, TensorEntry, checkpoint_files, read_header, read_tensor
from gsq.models.base import ModelAdapter

log = logging.getLogger(__name__)

_GGUF_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_TOKENIZER_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass
class StreamedModel:
    """A model skeleton (parameters on meta until loaded), its tokenizer and its weights."""

    model: nn.Module
    tokenizer: Any
    source: WeightSource


# --------------------------------------------------------------------------------------------
# Weight sources


class WeightSource:
    """Tensors of a model by parameter name, read on demand (see the module docstring).

    Keys below are the model's state-dict names (`model.layers.3.mlp.up_proj.weight`); `prefix`
    selects a module's keys (`model.layers.3.`)."""

    kind = ""

    def load(self, model: nn.Module, prefix: str, device: torch.device) -> None:
        """Give every parameter under `prefix` its fp32 values on `device`."""
        raise NotImplementedError

    def drop(self, model: nn.Module, prefix: str) -> None:
        """Free the parameters under `prefix` (back to the meta device)."""
        for name, param in list(model.named_parameters()):
            if name.startswith(prefix):
                _set_tensor(model, name, torch.empty_like(param, device="meta"))

    def saved(self, model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """The loaded module under `prefix` as a checkpoint holds it: checkpoint names, the
        source's dtypes, on the host."""
        raise NotImplementedError

    def passthrough(self, select: Callable[[str], bool]) -> list[TensorEntry]:
        """The source's tensors of the model keys `select` accepts, as the output checkpoint
        stores them, each read when written."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies the weights (sizes and sampled bytes of the files)."""
        raise NotImplementedError


class SafetensorsSource(WeightSource):
    """A folder of safetensors shards (single file or indexed)."""

    kind = "safetensors"

    def __init__(self, folder: Path, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        self.folder = folder
        self.files = checkpoint_files(folder)
        self.mapping = get_model_conversion_mapping(model)
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        meta = model.state_dict()
        headers = {path: read_header(path) for path in set(self.files.values())}
        self.info = {key: headers[path][key] for key, path in self.files.items()}
        self.target: dict[str, str] = {}  # checkpoint key -> model key (as transformers loads it)
        for key in self.files:
            target = rename_source_key(key, renamings, converters, model.base_model_prefix,
                                       meta)[0]
            if target not in meta and key in meta:
                target = key
            if target in meta:
                self.target[key] = target
        self.dtype = {}  # model key -> stored dtype (of its first checkpoint tensor)
        for key, target in self.target.items():
            self.dtype.setdefault(target, DTYPES[self.info[key]["dtype"]])

    def _keys(self, select: Callable[[str], bool]) -> list[str]:
        return [k for k, target in self.target.items() if select(target)]

    def files_of(self, prefix: str) -> set[str]:
        """Names of the shard files holding the tensors of the model keys under `prefix`."""
        return {self.files[k].name for k in self._keys(lambda k: k.startswith(prefix))}

    def load(self, model: nn.Module, prefix: str, device: torch.device) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        keys = self._keys(lambda k: k.startswith(prefix))
        tensors = {k: read_tensor(self.files[k], k).to(device) for k in keys}  # stored dtype
        config = LoadStateDictConfig(device_map={"": device}, dtype=torch.float32,
                                     weight_mapping=self.mapping)
        with _quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(model, tensors, config)
        missing = sorted(k for k in info.missing_keys if k.startswith(prefix)
                         and k in dict(model.named_parameters()))
        if missing or info.mismatched_keys or info.conversion_errors:
            what = (f"no tensor for '{missing[0]}'" if missing else
                    f"shape mismatch {sorted(info.mismatched_keys)[0]}"
                    if info.mismatched_keys else f"{next(iter(info.conversion_errors.values()))}")
            raise GSQError(f"cannot load '{prefix}' from '{self.folder}': {what}")
        _freeze(model, prefix)

    def saved(self, model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        from transformers.core_model_loading import revert_weight_conversion

        state = {k: v.detach().to(self.dtype.get(k, v.dtype)).cpu()
                 for k, v in model.state_dict().items() if k.startswith(prefix)}
        return dict(revert_weight_conversion(model, state))

    def passthrough(self, select: Callable[[str], bool]) -> list[TensorEntry]:
        return [TensorEntry(k, DTYPES[self.info[k]["dtype"]], tuple(self.info[k]["shape"]),
                            lambda k=k: read_tensor(self.files[k], k))
                for k in self._keys(select)]

    def fingerprint(self) -> dict:
        files = sorted(set(self.files.values()))
        config = self.folder / "config.json"
        return {"kind": self.kind, "files": {p.name: file_fingerprint(p) for p in files},
                "config": file_fingerprint(config) if config.is_file() else None}


class GGUFSource(WeightSource):
    """A `.gguf` file of a dense architecture gsq writes, decoded tensor by tensor."""

    kind = "gguf"

    def __init__(self, path: Path, tensors: list, model: nn.Module) -> None:
        from gsq.gguf import match_tensors, model_hparams

        self.path = path
        self.hp = model_hparams(model.config)
        by_gguf = match_tensors(tensors, model, self.hp, path,
                                owner="the model its keys describe")
        self.tensors = {by_gguf[t.name]: t for t in tensors if t.name in by_gguf}
        # decoded values are fp32; float tensors keep their own type in the output
        self.dtype = {k: _GGUF_DTYPES.get(t.type_name, torch.float32)
                      for k, t in self.tensors.items()}

    def _values(self, key: str) -> torch.Tensor:
        from gsq.gguf import hf_values, qk_heads

        t = self.tensors[key]
        return hf_values(t, qk_heads(t.name, self.hp))

    def load(self, model: nn.Module, prefix: str, device: torch.device) -> None:
        for name, _ in list(model.named_parameters()):
            if name.startswith(prefix):
                if name not in self.tensors:
                    raise GSQError(f"cannot load GGUF model '{self.path}': the file holds no "
                                   f"tensor for '{name}'")
                _set_tensor(model, name, self._values(name).to(device))

    def saved(self, model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(self.dtype.get(k, v.dtype)).cpu()
                for k, v in model.state_dict().items() if k.startswith(prefix)}

    def passthrough(self, select: Callable[[str], bool]) -> list[TensorEntry]:
        return [TensorEntry(k, self.dtype[k], tuple(t.shape),
                            lambda k=k: self._values(k).to(self.dtype[k]))
                for k, t in self.tensors.items() if select(k)]

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "file": file_fingerprint(self.path)}


class MemorySource(WeightSource):
    """A model loaded whole (fp32) by `load_base_model`: the fallback for sources that cannot be
    streamed. Blocks move to the device for their turn and back to the host."""

    kind = "memory"

    def __init__(self, model: nn.Module, files: list[Path]) -> None:
        self.model = model
        self.files = files
        self.keys = model_keys(model)

    def load(self, model: nn.Module, prefix: str, device: torch.device) -> None:
        _module_at(model, prefix).to(device)

    def drop(self, model: nn.Module, prefix: str) -> None:
        _module_at(model, prefix).to("cpu")

    def saved(self, model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        from transformers.core_model_loading import revert_weight_conversion

        state = {k: v.detach().cpu() for k, v in model.state_dict().items()
                 if k.startswith(prefix) and k in self.keys}
        return dict(revert_weight_conversion(model, state))

    def passthrough(self, select: Callable[[str], bool]) -> list[TensorEntry]:
        from transformers.core_model_loading import revert_weight_conversion

        state = {k: v.detach() for k, v in self.model.state_dict().items()
                 if k in self.keys and select(k)}
        return [TensorEntry(k, v.dtype, tuple(v.shape), lambda v=v: v.cpu())
                for k, v in revert_weight_conversion(self.model, state).items()]

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "files": {p.name: file_fingerprint(p) for p in self.files}}


def model_keys(model: nn.Module) -> set[str]:
    """State-dict names a checkpoint of `model` holds: each parameter once (a tied lm_head
    shares the embedding) and the persistent buffers."""
    keys = {name for name, _ in model.named_parameters()}
    keys |= {k for k in model.state_dict() if k not in dict(model.named_parameters(
        remove_duplicate=False))}
    return keys


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _module_at(model: nn.Module, prefix: str) -> nn.Module:
    name = prefix.rstrip(".")
    return model.get_submodule(name) if name else model


def _freeze(model: nn.Module, prefix: str) -> None:
    for name, param in model.named_parameters():
        if name.startswith(prefix):
            param.requires_grad_(False)


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" bar per block from transformers' loader."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def file_fingerprint(path: Path, samples: int = 16, chunk: int = 1 << 16) -> dict:
    """Size and SHA-256 of the first MiB plus `samples` evenly spaced chunks of a file: tells a
    changed checkpoint from the one a partial run started on without reading all of it."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        for i in range(samples):
            f.seek(size * i // samples)
            digest.update(f.read(chunk))
    return {"size": size, "sha256_sampled": digest.hexdigest()}


# --------------------------------------------------------------------------------------------
# Opening a model


def open_model(source: str) -> StreamedModel:
    """A skeleton, tokenizer and weight source for anything `gsq quantize` accepts as a model
    (see the module docstring for which sources stream)."""
    from gsq.models.loading import looks_like_path, resolve_model_source

    source = resolve_model_source(source)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise GSQError(f"model path '{source}' is a file but not a .gguf file")
        return _open_gguf(path)
    if path.is_dir():
        return _open_folder(source, path)
    if looks_like_path(source):
        raise GSQError(f"model path '{source}' does not exist")
    return _open_hub(source)


def skeleton(config: Any) -> nn.Module:
    """The causal-LM of `config` with fp32 parameters on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    dtype = getattr(config, "dtype", None)
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as err:
        raise GSQError(f"cannot build model of type '{config.model_type}': "
                       f"{str(err).strip().splitlines()[0]}") from err
    model.config.dtype = dtype  # the output checkpoint keeps the source's dtype label
    return model.eval().requires_grad_(False)


def _open_folder(source: str, folder: Path) -> StreamedModel:
    from gsq.models.loading import load_config_and_tokenizer

    config, tokenizer = load_config_and_tokenizer(source, str(folder))
    if not checkpoint_files(folder):
        return _open_in_memory(source, sorted(p for p in folder.iterdir() if p.is_file()
                                              and p.suffix in (".bin", ".pt", ".pth")))
    model = skeleton(config)
    return StreamedModel(model, tokenizer, SafetensorsSource(folder, model))


def _open_hub(repo: str) -> StreamedModel:
    """A hub id: tokenizer and config as transformers fetches them, then the safetensors shards
    into the hub cache (`snapshot_download`)."""
    from gsq.models.loading import load_config_and_tokenizer, translate_load_error

    load_config_and_tokenizer(repo, repo)  # the usual errors (unreachable hub, unknown id) first
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo, allow_patterns=["*.safetensors",
                                                              *_TOKENIZER_PATTERNS]))
    except OSError as err:
        raise translate_load_error(repo, err) from err
    return _open_folder(repo, folder)


def _open_gguf(path: Path) -> StreamedModel:
    from gsq.gguf import ARCHITECTURES, field_value, read_gguf

    fields, tensors = read_gguf(path)
    arch = field_value(fields["general.architecture"]) if "general.architecture" in fields else ""
    if arch not in ARCHITECTURES:
        return _open_in_memory(str(path), [path])
    from gsq.models.gguf_decoded import gguf_config_and_tokenizer

    config, tokenizer = gguf_config_and_tokenizer(path, fields, tensors)
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        return _open_in_memory(str(path), [path])  # experts: fused parameters, filled whole
    config.dtype = torch.float32  # decoded GGUF values are written in fp32 (floats as stored)
    model = skeleton(config)
    return StreamedModel(model, tokenizer, GGUFSource(path, tensors, model))


def _open_in_memory(source: str, files: list[Path]) -> StreamedModel:
    from gsq.models.loading import load_base_model

    log.info("%s cannot be streamed (no safetensors, or a GGUF architecture gsq does not "
             "decode itself): loading it whole in fp32", source)
    model, tokenizer = load_base_model(source)
    return StreamedModel(model, tokenizer, MemorySource(model, files))


# --------------------------------------------------------------------------------------------
# The block loop's loader


class StreamedBlocks:
    """`BlockLoader` over a `WeightSource`: embeddings loaded while block-0 inputs are captured,
    then each block loaded for its turn and dropped after it was written."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, source: WeightSource) -> None:
        self.model = model
        self.adapter = adapter
        self.source = source
        names = {id(m): n for n, m in model.named_modules()}
        self.embedding_prefixes = [names[id(m)] + "." for m in adapter.embedding_modules(model)]

    def block_prefix(self, index: int) -> str:
        return self.adapter.first_block_prefix().format(i=index)

    def load_embeddings(self, model: nn.Module, adapter: ModelAdapter,
                        device: torch.device) -> None:
        for prefix, module in zip(self.embedding_prefixes, adapter.embedding_modules(model),
                                  strict=True):
            self.source.load(model, prefix, device)
            module.to(device)  # buffers (rotary frequencies)

    def release_embeddings(self, model: nn.Module, adapter: ModelAdapter) -> None:
        for prefix in self.embedding_prefixes:
            self.source.drop(model, prefix)

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        self.source.load(self.model, self.block_prefix(index), device)
        block.to(device)  # buffers, if a block has any

    def release(self, index: int, block: nn.Module) -> None:
        self.source.drop(self.model, self.block_prefix(index))

    def module_prefix(self, module: nn.Module) -> str:
        return next(n for n, m in self.model.named_modules() if m is module) + "."

    def load_module(self, model: nn.Module, module: nn.Module, device: torch.device) -> None:
        """A module outside the blocks (final norm, LM head). An LM head tied to the embeddings
        (no tensor of its own in the checkpoint) shares the embedding weight, read for it."""
        if self._tied(module):
            self.source.load(model, self.embedding_prefixes[0], device)
            model.tie_weights()
        else:
            self.source.load(model, self.module_prefix(module), device)
        module.to(device)

    def release_module(self, model: nn.Module, module: nn.Module) -> None:
        if self._tied(module):
            self.source.drop(model, self.embedding_prefixes[0])
            model.tie_weights()  # the head lets go of the values too
        else:
            self.source.drop(model, self.module_prefix(module))

    def _tied(self, module: nn.Module) -> bool:
        config = self.model.config.get_text_config()
        return (getattr(config, "tie_word_embeddings", False)
                and module is self.adapter.lm_head(self.model))
