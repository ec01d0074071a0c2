"""Peak host memory of `gsq quantize` is bounded by a block, not by the model.

A random Llama whose fp32 safetensors are three times a host bound is generated tensor by tensor
(`write_random_checkpoint`) and quantized in a subprocess (RTN on the attention linears of block 0,
so the test stays fast; every block still goes through the streaming loader and writer). The peak
RSS the run records in its report (Linux VmHWM) must stay under the bound, which the model loaded
whole in fp32, as gsq did before streaming, could not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BOUND_GIB = 1.0
BLOCKS = 54  # 54 blocks of 15.2M parameters: 3.06 GiB of fp32 safetensors


@pytest.fixture(scope="module")
def big_model(tmp_path_factory, byte_tokenizer) -> Path:
    from gsq.models.synthetic import random_config, write_random_checkpoint

    config = random_config("llama", 256, hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=BLOCKS, num_attention_heads=16,
                           num_key_value_heads=4)
    path = tmp_path_factory.mktemp("big") / "model"
    return write_random_checkpoint(path, config, byte_tokenizer, dtype=torch.float32,
                                   max_shard_bytes=256 << 20)


def _data_bytes(folder: Path) -> int:
    from gsq.io.shards import read_header

    return sum(info["data_offsets"][1] - info["data_offsets"][0]
               for path in folder.glob("model*.safetensors")
               for info in read_header(path).values())


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's VmHWM")
def test_peak_rss_stays_under_a_third_of_the_model(big_model, tmp_path):
    size = _data_bytes(big_model)
    assert size > 3 * BOUND_GIB * 2**30
    calib = tmp_path / "calib.txt"
    calib.write_text("the cat sat on the mat and the dog sat on the log " * 40)
    out = tmp_path / "q"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    argv = [sys.executable, "-m", "gsq.cli", "-q", "quantize", str(big_model), "--method", "rtn",
            "--max-blocks", "1", "--skip", "*.mlp.*", "--nsamples", "2", "--val-samples", "1",
            "--gptq-samples", "2", "--seqlen", "32", "--calib", str(calib), "--out", str(out)]
    subprocess.run(argv, env=env, check=True, capture_output=True)
    report = json.loads((out / "report.json").read_text())
    assert report["quantized_tensors"] == 4 and report["blocks_total"] == BLOCKS
    assert report["peak_host_rss_gib"] < BOUND_GIB, report["peak_host_rss_gib"]
    assert _data_bytes(out) == size  # every tensor written, in the source's fp32
