"""`gsq quantize` refuses an architecture, or an architecture with a GGUF target or a later export
format it cannot do, from the config alone: no weight is loaded, one error line, nothing at --out.

The sources here are config-only folders (config.json, no weights) and key-only GGUF files: a
refusal that needed the weights would fail on them differently, and transformers' loaders are
replaced by stubs that fail the test if called.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gsq.cli.__main__ import main
from gsq.models.synthetic import random_config


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any model or tokenizer is loaded."""
    import transformers

    def refuse(*args, **kwargs):
        pytest.fail("a model or tokenizer was loaded before the architecture check")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def _config_dir(root: Path, arch: str, **overrides) -> Path:
    path = root / arch
    random_config(arch, 256, **overrides).save_pretrained(path)
    return path


def _gguf_keys_only(path: Path, arch: str, name: str = "tiny") -> Path:
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_block_count(2)
    writer.add_token_list([b"a", b"b"])  # an array before nothing else: must be skipped
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _refused(capsys, tmp_path: Path, model: Path, *extra: str) -> str:
    out = tmp_path / "out"
    code = main(["-q", "quantize", str(model), "--out", str(out), "--method", "rtn", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("gsq: error: "), err
    assert not out.exists() and list(tmp_path.glob(".out*")) == []
    return err[0]


def test_unsupported_model_type_from_config_json(capsys, tmp_path, no_loading):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=4).save_pretrained(tmp_path / "gpt2")
    line = _refused(capsys, tmp_path, tmp_path / "gpt2")
    assert "unsupported architecture 'gpt2'" in line
    assert "llama, mistral, mixtral, qwen2, qwen3, qwen3_moe" in line


def test_model_type_transformers_does_not_know(capsys, tmp_path, no_loading):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.json").write_text('{"model_type": "brand_new_lm"}')
    assert "unsupported architecture 'brand_new_lm'" in _refused(capsys, tmp_path,
                                                                   tmp_path / "new")


def test_unsupported_gguf_architecture(capsys, tmp_path, no_loading):
    path = _gguf_keys_only(tmp_path / "m.gguf", "gemma3")
    assert "unsupported architecture 'gemma3'" in _refused(capsys, tmp_path, path)


@pytest.mark.parametrize("arch, overrides, needle", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32}, "sliding-window"),
    ("qwen3", {"attention_bias": True}, "attention biases"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope scaling 'dynamic'"),
])
def test_gguf_target_checks_the_config_details(capsys, tmp_path, no_loading, arch, overrides,
                                               needle):
    """The model type writes GGUF, the config's details do not: refused before loading."""
    model = _config_dir(tmp_path, arch, **overrides)
    assert needle in _refused(capsys, tmp_path, model, "--target", "gguf:Q4_0")


def test_export_format_gguf_is_checked_like_a_target(capsys, tmp_path, no_loading):
    model = _config_dir(tmp_path, "qwen2", use_sliding_window=True, sliding_window=32)
    line = _refused(capsys, tmp_path, model, "--export-format", "gguf")
    assert "sliding-window" in line


@pytest.mark.parametrize("overrides, needle", [
    ({"mlp_only_layers": [0]}, "no dense layers"),
    ({"norm_topk_prob": False}, "norm_topk_prob"),
])
def test_qwen3_moe_configs_gguf_cannot_hold_are_refused(capsys, tmp_path, no_loading, overrides,
                                                        needle):
    """qwen3_moe writes GGUF, but llama.cpp's qwen3moe has no dense layers and always
    renormalises the top-k expert weights: such configs are refused for a target."""
    model = _config_dir(tmp_path, "qwen3_moe", **overrides)
    assert needle in _refused(capsys, tmp_path, model, "--target", "gguf:Q4_0")


def test_gguf_file_missing_a_key_the_architecture_needs(capsys, tmp_path, no_loading):
    path = _gguf_keys_only(tmp_path / "q.gguf", "qwen3moe")
    line = _refused(capsys, tmp_path, path, "--target", "gguf:Q4_0")
    assert "has no key 'qwen3moe.attention.head_count'" in line


def test_gguf_export_of_a_tokenizer_llamacpp_cannot_run(capsys, tmp_path, no_loading):
    """A WordPiece tokenizer.json beside the config: GGUF converts byte-level and SentencePiece
    BPE tokenizers only (tests/export/test_gguf_tokenizer.py has the other refusals)."""
    model = _config_dir(tmp_path, "llama")
    (model / "tokenizer.json").write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    line = _refused(capsys, tmp_path, model, "--export-format", "gguf")
    assert "cannot convert this WordPiece tokenizer to GGUF" in line
    assert "SentencePiece BPE ones (Llama 2 / Mistral style)" in line


def test_supported_combinations_get_past_the_check(tmp_path, monkeypatch):
    """llama3, qwen3 and both MoE types + GGUF target, qwen2 + compressed-tensors pass the
    check and reach loading."""
    import transformers

    loaded = []

    def stop(source, *args, **kwargs):
        loaded.append(Path(source).name)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", stop)
    for arch, extra in (("llama3", ["--target", "gguf:Q4_0"]),
                        ("qwen3", ["--export-format", "gguf"]),
                        ("qwen2", ["--export-format", "compressed-tensors"]),
                        ("mixtral", ["--target", "gguf:Q4_0"]),
                        ("qwen3_moe", ["--export-format", "gguf"])):
        model = _config_dir(tmp_path, arch)
        assert main(["-q", "quantize", str(model), "--out", str(tmp_path / "o"), *extra]) == 2
    assert loaded == ["llama3", "qwen3", "qwen2", "mixtral", "qwen3_moe"]
