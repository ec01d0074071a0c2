"""What each architecture supports (gsq.models.registry), checked from configs alone."""

from __future__ import annotations

import pytest

from gsq.errors import GSQError
from gsq.models.registry import CAPABILITIES, check_architecture, support_table, supports
from gsq.models.synthetic import random_config


def test_support_table():
    table = support_table()
    assert set(table) == {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"}
    assert all(set(row) == set(CAPABILITIES) for row in table.values())
    assert all(row["quantize"] and row["compressed-tensors"] for row in table.values())
    assert all(row["gguf"] and row["refine"] for row in table.values())
    for model_type, row in table.items():  # refine runs on what the GGUF layer reads
        assert row["refine"] == (row["gguf"] and row["quantize"]), model_type
    assert not supports("gpt2", "quantize") and not supports("gpt2", "compressed-tensors")
    with pytest.raises(ValueError, match="capability must be one of"):
        supports("llama", "onnx")


def test_check_architecture_names_what_is_supported():
    check_architecture("qwen3", needs=("compressed-tensors",))
    with pytest.raises(GSQError, match=r"unsupported architecture 'gpt2': gsq supports llama, "):
        check_architecture("gpt2")
    with pytest.raises(GSQError, match="unsupported architecture 'None'"):
        check_architecture(None)  # a config.json without model_type
    check_architecture("qwen2", needs=("refine", "gguf"))
    check_architecture("mixtral", needs=("gguf", "refine"))
    with pytest.raises(GSQError, match="sliding-window"):
        check_architecture("qwen2", random_config("qwen2", 256, use_sliding_window=True,
                                                  sliding_window=32), ("refine",))


def test_gguf_needs_check_the_config_details():
    for arch in ("llama", "llama3", "llama-yarn", "mistral", "qwen2", "qwen3"):
        config = random_config(arch, 256)
        check_architecture(config.model_type, config, ("gguf", "refine"))
    dynamic = random_config("llama", 256, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                           "rope_theta": 10000.0})
    check_architecture("llama", dynamic)  # no GGUF need: fine
    with pytest.raises(GSQError, match="rope scaling 'dynamic'"):
        check_architecture("llama", dynamic, ("gguf",))
    with pytest.raises(GSQError, match="attention biases"):
        check_architecture("qwen3", random_config("qwen3", 256, attention_bias=True),
                           ("refine",))
