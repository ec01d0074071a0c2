"""Shared fixtures: a tiny random Llama built in-process and a byte-level tokenizer (no
downloads)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter (tests/kernels). TRITON_INTERPRET must be set
# before anything imports triton (compressed-tensors and transformers do, during collection):
# triton's own library functions are compiled-or-interpreted when triton.language is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_VOCAB = 256
TINY_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    """The suite targets 2-core machines; more threads only add overhead on these tiny shapes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_tiny_llama(seed: int = 0, **overrides):
    """A random 2-block fp32 Llama: hidden 64, intermediate 128, 4 heads, 2 kv heads, vocab 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    with torch.random.fork_rng():  # model init draws from the global RNG; keep it out of the tests
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval().requires_grad_(False)


def build_tiny_moe(arch: str, seed: int = 0, **overrides):
    """A random 2-block fp32 MoE of `gsq.models.synthetic` ("qwen3_moe" or "mixtral": hidden 64,
    4 experts top-2) with the byte tokenizer's vocabulary (256)."""
    from gsq.models.synthetic import build_random_model, random_config

    return build_random_model(random_config(arch, TINY_VOCAB, **overrides), seed=seed)


@pytest.fixture(scope="session")
def tiny_moe() -> Callable[..., torch.nn.Module]:
    """Factory: `tiny_moe(arch, seed=0, **config_overrides)` -> a fresh Qwen3-MoE or Mixtral."""
    return build_tiny_moe


def build_byte_tokenizer():
    """Byte-level BPE without merges: exactly 256 byte tokens, ids 0..255."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == TINY_VOCAB
    bpe = models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[])
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="session")
def tiny_llama() -> Callable[..., torch.nn.Module]:
    """Factory: `tiny_llama(seed=0, **config_overrides)` -> a fresh LlamaForCausalLM."""
    return build_tiny_llama


@pytest.fixture(scope="session")
def byte_tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama plus the byte tokenizer saved with save_pretrained (read-only use)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(0).save_pretrained(path)
    build_byte_tokenizer().save_pretrained(path)
    return path


def build_random_windows(counts: dict[str, int], seqlen: int,
                         seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token windows {split: (n, seqlen)} for the pipeline tests."""
    gen = torch.Generator().manual_seed(seed)
    return {split: torch.randint(0, TINY_VOCAB, (n, seqlen), generator=gen)
            for split, n in counts.items()}


@pytest.fixture(scope="session")
def random_windows() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory: `random_windows({"train": 16, ...}, seqlen, seed=0)`."""
    return build_random_windows


@pytest.fixture(scope="session")
def llama_cpp():
    """The real llama.cpp client; a missing package fails loudly (CI installs `.[dev]`)."""
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is needed for the GGUF tests: pip install -e '.[dev]'")
    return llama_cpp


def _byte_bpe_tokenizer():
    """Byte-level BPE (GPT-2 pre-tokenizer) with a few merges: convertible to GGUF."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")]
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="session")
def build_byte_bpe_tokenizer() -> Callable:
    """Factory of a small byte-level BPE tokenizer (a new object per call)."""
    return _byte_bpe_tokenizer


# Final-norm multiplier of the `arch_model_dir` models: next-token entropy ~6 nats instead of the
# ~10.8 of a uniform guess over 49,152 tokens, so a broken tensor layout shows in the logits.
ARCH_LOGIT_SCALE = 20.0


@pytest.fixture(scope="session")
def demo_tok():
    """SmolLM2's real tokenizer (gsq.models.synthetic.demo_tokenizer), loaded once per session."""
    from gsq.models.synthetic import demo_tokenizer

    return demo_tokenizer()


@pytest.fixture(scope="session")
def arch_model_dir(tmp_path_factory: pytest.TempPathFactory, demo_tok) -> Callable[..., Path]:
    """Factory: `arch_model_dir(arch, seed=0, logit_scale=ARCH_LOGIT_SCALE, **config_overrides)`
    -> a folder holding a tiny random model of `arch` (a key of synthetic.ARCHITECTURES) in bf16
    sharded safetensors, with SmolLM2's tokenizer (vocab 49,152). Cached: read-only use."""
    import json

    from gsq.models.synthetic import build_random_model, random_config, save_random_model

    cache: dict[str, Path] = {}

    def make(arch: str, seed: int = 0, logit_scale: float = ARCH_LOGIT_SCALE,
             **overrides) -> Path:
        key = json.dumps([arch, seed, logit_scale, overrides], sort_keys=True)
        if key not in cache:
            config = random_config(arch, len(demo_tok), **overrides)
            model = build_random_model(config, seed=seed, logit_scale=logit_scale)
            path = tmp_path_factory.mktemp(f"arch-{arch}")
            cache[key] = save_random_model(model, demo_tok, path)
        return cache[key]

    return make
