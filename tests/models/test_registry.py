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
    assert table["llama"]["gguf"] and table["llama"]["refine"]
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
    with pytest.raises(GSQError, match="refine is not supported for 'qwen2' models; it is for "
                                       "llama"):
        check_architecture("qwen2", needs=("refine",))


def test_gguf_needs_check_the_config_details():
    check_architecture("llama", random_config("llama", 256), ("gguf",))
    check_architecture("llama", random_config("llama3", 256))  # no GGUF need: fine
    with pytest.raises(GSQError, match="rope scaling 'llama3'"):
        check_architecture("llama", random_config("llama3", 256), ("gguf",))
    with pytest.raises(GSQError, match="rope scaling 'yarn'"):
        check_architecture("llama", random_config("llama-yarn", 256), ("refine",))
