"""gsq: Gumbel-Softmax Quantization (GSQ) of LLM weights to 2/3/4-bit and ternary scalar grids.

Public surface:
    quantize(model_source, config, calib=None, out=None, device="cpu") -> QuantizeResult
    quantize_model(model, tokenizer, config, calib_tokens, device) -> (records, report)
    evaluate(model_or_source, text, base=None, ...) -> {"ppl", ...}
    gsq.api.export(quantized_dir, out, format="gguf"), gsq.api.refine(gguf, base, out)
    QuantizeConfig, TrainConfig, InitConfig, QuantSpec, QuantizedWeight
    cpu_preset(), gpu_preset(), paper_preset()
    load_quantized(path) -> (model, tokenizer, records)
"""

from gsq.api import QuantizeResult, evaluate, quantize, quantize_model
from gsq.config import PRESETS, QuantizeConfig, cpu_preset, gpu_preset, paper_preset
from gsq.errors import GSQError
from gsq.models.quantized import load_quantized
from gsq.quant.quantizers import InitConfig
from gsq.quant.trainer import TrainConfig
from gsq.quant.types import QuantizedWeight, QuantSpec

__all__ = [
    "PRESETS", "GSQError", "InitConfig", "QuantSpec", "QuantizeConfig", "QuantizeResult",
    "QuantizedWeight", "TrainConfig", "cpu_preset", "evaluate", "gpu_preset", "load_quantized",
    "paper_preset", "quantize", "quantize_model",
]
__version__ = "0.1.0"
